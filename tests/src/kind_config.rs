//! kind's config API, kind.x-k8s.io/v1alpha4, as kind decodes it: strictly (an unknown field
//! is an error), into these types. They copy the fields, JSON names and types of
//! kubernetes-sigs/kind's pkg/apis/config/v1alpha4/types.go (Cluster, Node, Networking,
//! PatchJSON6902, Mount, PortMapping; as of commit 00b38e3bbfdd20ec214924967fcfa7b5b0f51373),
//! so that decoding deploy/kind/cluster.yaml here fails where `kind create cluster` would,
//! without kind. Most fields are never read: they are here so that decoding accepts them.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cluster {
    pub kind: Option<String>,
    pub api_version: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub nodes: Vec<Node>,
    pub networking: Option<Networking>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub runtime_config: Option<BTreeMap<String, String>>,
    pub kubeadm_config_patches: Option<Vec<String>>,
    #[serde(rename = "kubeadmConfigPatchesJSON6902")]
    pub kubeadm_config_patches_json6902: Option<Vec<PatchJson6902>>,
    pub containerd_config_patches: Option<Vec<String>>,
    #[serde(rename = "containerdConfigPatchesJSON6902")]
    pub containerd_config_patches_json6902: Option<Vec<String>>,
}

#[derive(Deserialize, Debug, PartialEq)]
pub enum NodeRole {
    #[serde(rename = "control-plane")]
    ControlPlane,
    #[serde(rename = "worker")]
    Worker,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    pub role: Option<NodeRole>,
    pub image: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub extra_mounts: Option<Vec<Mount>>,
    pub extra_port_mappings: Option<Vec<PortMapping>>,
    pub gpus: Option<String>,
    pub kubeadm_config_patches: Option<Vec<String>>,
    #[serde(rename = "kubeadmConfigPatchesJSON6902")]
    pub kubeadm_config_patches_json6902: Option<Vec<PatchJson6902>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Networking {
    pub ip_family: Option<IpFamily>,
    #[serde(rename = "apiServerPort")]
    pub api_server_port: Option<i32>,
    #[serde(rename = "apiServerAddress")]
    pub api_server_address: Option<String>,
    pub pod_subnet: Option<String>,
    pub service_subnet: Option<String>,
    #[serde(rename = "disableDefaultCNI")]
    pub disable_default_cni: Option<bool>,
    pub kube_proxy_mode: Option<ProxyMode>,
    pub dns_search: Option<Vec<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
    Dual,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Iptables,
    Ipvs,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PatchJson6902 {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub patch: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mount {
    pub container_path: Option<String>,
    pub host_path: Option<String>,
    pub read_only: Option<bool>,
    pub selinux_relabel: Option<bool>,
    pub propagation: Option<MountPropagation>,
}

#[derive(Deserialize, Debug)]
pub enum MountPropagation {
    None,
    HostToContainer,
    Bidirectional,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortMapping {
    pub container_port: Option<i32>,
    pub host_port: Option<i32>,
    pub listen_address: Option<String>,
    pub protocol: Option<Protocol>,
}

#[derive(Deserialize, Debug)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// Decodes a kind config as kind does: strictly, into [`Cluster`].
pub fn parse(text: &str) -> Result<Cluster, serde_yaml::Error> {
    serde_yaml::from_str(text)
}
