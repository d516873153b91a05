/* Bench guest: one byte on COM1, then halts for good with interrupts off (the vCPU sleeps in
 * KVM; the VMM's memory can be measured while it runs). */
	.code64
	.globl _start
	.text
_start:
	mov	$0x3f8, %dx
	mov	$'I', %al
	out	%al, %dx
	cli
1:	hlt
	jmp	1b
