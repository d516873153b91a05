//! kubectl's own validation of Kubernetes manifests, offline.
//!
//! kubectl validates a manifest client-side (`apply --dry-run=client --validate=true`) against
//! the OpenAPI schema that it downloads from the API server, after mapping each object's kind
//! through the server's discovery documents. [`FakeApiServer`] is such a server on 127.0.0.1
//! that serves Kubernetes 1.32's own schema and discovery documents from tests/k8s-schema/ (see
//! its README): /openapi/v2 as the protobuf kubectl asks for, /api, /apis and the
//! group-versions' resource lists; every other request (the GET of each object that `apply`
//! makes, /openapi/v3) is a 404 (the object does not exist yet; without OpenAPI v3 kubectl
//! cannot see that the server would check fields itself, so it checks them, against the v2
//! schema).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{not_run, run_with_timeout, workspace_root, Out, Prereq};

/// `tests/k8s-schema/<p>`: the schema and discovery documents the fake server serves.
pub fn k8s_schema(p: &str) -> PathBuf {
    workspace_root().join("tests/k8s-schema").join(p)
}

fn read_json(p: &Path) -> Value {
    let text =
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The (apiVersion, kind) pairs tests/k8s-schema/swagger.json has a schema for. kubectl skips
/// validation of a kind the schema lacks, so every kind we apply must be there.
pub fn schema_kinds() -> Vec<(String, String)> {
    let doc = read_json(&k8s_schema("swagger.json"));
    let mut v = Vec::new();
    for s in doc["definitions"].as_object().unwrap().values() {
        for gvk in s["x-kubernetes-group-version-kind"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let (g, ver, k) = (&gvk["group"], &gvk["version"], &gvk["kind"]);
            let (g, ver) = (g.as_str().unwrap(), ver.as_str().unwrap());
            let api = if g.is_empty() {
                ver.to_string()
            } else {
                format!("{g}/{ver}")
            };
            v.push((api, k.as_str().unwrap().to_string()));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The fake API server

/// path -> (content type, body)
type Routes = BTreeMap<String, (&'static str, Vec<u8>)>;

const JSON: &str = "application/json";

/// /openapi/v2 as kubectl asks for it: gnostic's protobuf, not JSON.
const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// The group-versions tests/k8s-schema/discovery/ holds (refresh.py's `KINDS`), as API paths.
const GROUP_VERSIONS: [&str; 4] = [
    "api/v1",
    "apis/apps/v1",
    "apis/rbac.authorization.k8s.io/v1",
    "apis/node.k8s.io/v1",
];

/// The fake API server: serves what tests/k8s-schema/ holds, records the paths asked for.
pub struct FakeApiServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let routes = Arc::new(routes());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        // Lives as long as the test binary: an idle accept() of a loopback socket.
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (routes, seen) = (routes.clone(), seen.clone());
                thread::spawn(move || serve(conn, &routes, &seen));
            }
        });
        FakeApiServer { addr, requests }
    }

    /// Where it listens (`http://{addr}` is the cluster's server).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The paths asked for so far, in order, without query or trailing `/`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Everything the server answers: the OpenAPI document, discovery and /version.
fn routes() -> Routes {
    let mut routes = Routes::new();
    let openapi = read_json(&k8s_schema("swagger.json"));
    routes.insert(
        "/openapi/v2".into(),
        (OPENAPI_V2_PROTOBUF, pb::document(&openapi)),
    );
    routes.extend(discovery_routes());
    let version = json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0"});
    routes.insert("/version".into(), (JSON, version.to_string().into_bytes()));
    routes
}

/// Each group-version's resource list as stored, and the /api and /apis indexes of them.
fn discovery_routes() -> Routes {
    let mut routes = Routes::new();
    let mut groups = Vec::new();
    let mut core = Vec::new();
    let disc = k8s_schema("discovery");
    for gv in GROUP_VERSIONS {
        let list = read_json(&disc.join(format!("{gv}.json")));
        let group_version = list["groupVersion"].as_str().unwrap().to_string();
        match group_version.split_once('/') {
            None => core.push(group_version.clone()),
            Some((g, v)) => {
                let ver = json!({"groupVersion": group_version, "version": v});
                groups.push(json!({"name": g, "versions": [ver], "preferredVersion": ver}));
            }
        }
        routes.insert(format!("/{gv}"), (JSON, list.to_string().into_bytes()));
    }
    let api = json!({"kind": "APIVersions", "versions": core});
    routes.insert("/api".into(), (JSON, api.to_string().into_bytes()));
    let apis = json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups});
    routes.insert("/apis".into(), (JSON, apis.to_string().into_bytes()));
    routes
}

/// One request per connection (`Connection: close`). Only the head is read: kubectl only
/// GETs from this server.
fn serve(mut conn: TcpStream, routes: &Routes, seen: &Mutex<Vec<String>>) {
    let Some(path) = request_path(&mut conn) else {
        return;
    };
    seen.lock().unwrap().push(path.clone());
    let not_found = json!({"kind": "Status", "apiVersion": "v1",
        "status": "Failure", "reason": "NotFound", "code": 404})
    .to_string()
    .into_bytes();
    let (status, ctype, body) = match routes.get(&path) {
        Some((t, b)) => ("200 OK", *t, b.as_slice()),
        None => ("404 Not Found", JSON, not_found.as_slice()),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(body);
}

/// The request's path, without query or trailing `/`; None if the client went away first.
fn request_path(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap().trim_end_matches('/');
    Some(path.to_string())
}

// ---------------------------------------------------------------------------------------------
// kubectl

/// kubectl, or None (reported not run) where there is none.
pub fn kubectl(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        not_run(
            test,
            Prereq::Kubectl,
            "no kubectl (hack/test.sh installs Debian's kubernetes-client)",
            false,
        );
    }
    found
}

/// `kubectl apply --dry-run=client --validate=true -f FILE` against `server`, with a
/// kubeconfig and caches of its own. `--validate=true` is client-side schema validation in
/// every kubectl (Debian 12's 1.20 too; `strict` in newer ones).
pub fn kubectl_apply_dry_run(kubectl: &Path, server: &FakeApiServer, file: &Path) -> Out {
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_for(server.addr())).unwrap();
    let mut cmd = Command::new(kubectl);
    cmd.env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(home.path().join("cache"))
        .args(["apply", "--dry-run=client", "--validate=true", "-f"])
        .arg(file);
    run_with_timeout(cmd, None, Duration::from_secs(120)).unwrap()
}

/// A kubeconfig whose one context is the fake server, over plain HTTP, with no credentials.
fn kubeconfig_for(server: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: fake, cluster: {{server: \"http://{server}\"}}}}]\n\
         users: [{{name: fake, user: {{}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
         current-context: fake\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI v2 document as protobuf

/// Protocol buffers wire format, for the gnostic `openapi_v2.Document` that kubectl decodes
/// (github.com/google/gnostic-models, openapiv2/OpenAPIv2.proto: the field numbers below).
mod pb {
    use serde_json::Value;

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A length-delimited field (string, bytes, message).
    fn field(out: &mut Vec<u8>, num: u64, data: &[u8]) {
        varint(num << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn string(out: &mut Vec<u8>, num: u64, s: &str) {
        field(out, num, s.as_bytes());
    }

    /// Any { string yaml = 2 } (JSON is YAML).
    fn any(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 2, &v.to_string());
        o
    }

    /// NamedSchema / NamedAny { string name = 1; value = 2 }.
    fn named(name: &str, value: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 1, name);
        field(&mut o, 2, value);
        o
    }

    fn strings(v: &Value) -> Vec<&str> {
        match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|s| s.as_str().expect("a string")).collect(),
            _ => panic!("not a string or strings: {v}"),
        }
    }

    /// Schema. Every key of the (trimmed) document is encoded or the encoder refuses: nothing
    /// of the schema is silently left out.
    fn schema(s: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        let m = s.as_object().unwrap_or_else(|| panic!("schema {s}"));
        for (k, v) in m {
            match k.as_str() {
                "$ref" => string(&mut o, 1, v.as_str().unwrap()),
                "format" => string(&mut o, 2, v.as_str().unwrap()),
                "required" => strings(v).iter().for_each(|r| string(&mut o, 19, r)),
                "additionalProperties" => field(&mut o, 21, &additional_properties(v)),
                "type" => field(&mut o, 22, &type_item(v)),
                "items" => field(&mut o, 23, &items(v)),
                "properties" => field(&mut o, 25, &properties(v)),
                x if x.starts_with("x-") => field(&mut o, 31, &named(x, &any(v))),
                x => panic!("schema key {x} has no encoding here: add it"),
            }
        }
        o
    }

    /// AdditionalPropertiesItem { oneof { Schema schema = 1; bool boolean = 2 } }
    fn additional_properties(v: &Value) -> Vec<u8> {
        let mut ap = Vec::new();
        match v {
            Value::Bool(b) => {
                varint(2 << 3, &mut ap);
                varint(*b as u64, &mut ap);
            }
            _ => field(&mut ap, 1, &schema(v)),
        }
        ap
    }

    /// TypeItem { repeated string value = 1 }
    fn type_item(v: &Value) -> Vec<u8> {
        let mut t = Vec::new();
        strings(v).iter().for_each(|x| string(&mut t, 1, x));
        t
    }

    /// ItemsItem { repeated Schema schema = 1 }
    fn items(v: &Value) -> Vec<u8> {
        let mut it = Vec::new();
        match v {
            Value::Array(a) => a.iter().for_each(|x| field(&mut it, 1, &schema(x))),
            _ => field(&mut it, 1, &schema(v)),
        }
        it
    }

    /// Properties { repeated NamedSchema additional_properties = 1 }
    fn properties(v: &Value) -> Vec<u8> {
        let mut p = Vec::new();
        for (name, s) in v.as_object().unwrap() {
            field(&mut p, 1, &named(name, &schema(s)));
        }
        p
    }

    /// Document { swagger = 1; Info info = 2 { title = 1; version = 2 }; Definitions
    /// definitions = 9 { repeated NamedSchema additional_properties = 1 } }.
    pub fn document(d: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        string(&mut o, 1, d["swagger"].as_str().unwrap());
        let mut info = Vec::new();
        string(&mut info, 1, d["info"]["title"].as_str().unwrap());
        string(&mut info, 2, d["info"]["version"].as_str().unwrap());
        field(&mut o, 2, &info);
        let mut defs = Vec::new();
        for (name, s) in d["definitions"].as_object().unwrap() {
            field(&mut defs, 1, &named(name, &schema(s)));
        }
        field(&mut o, 9, &defs);
        o
    }
}
