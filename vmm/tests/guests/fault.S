/* Test guest: loads an IDT with no valid entries and raises a page fault: the double and
 * triple fault that follow must end the run as a triple fault, not hang the VMM. */
	.code64
	.globl _start
	.text
_start:
	lidt	idtr(%rip)
	mov	$0x8000000000, %rax	/* above the identity-mapped 4 GiB: not present */
	mov	(%rax), %rbx
1:	hlt
	jmp	1b
	.section .rodata
idtr:
	.word	0
	.quad	0
