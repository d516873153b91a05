/* Bench guest: powers off at its first instruction (VMM start -> first guest instruction). */
	.code64
	.globl _start
	.text
_start:
	mov	$0x600, %dx
	mov	$0x34, %al
	out	%al, %dx
1:	hlt
	jmp	1b
