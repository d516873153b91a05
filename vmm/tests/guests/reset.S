/* Test guest: one byte on COM1, then the i8042 reset (what Linux's reboot does here). */
	.code64
	.globl _start
	.text
_start:
	mov	$0x3f8, %dx
	mov	$'R', %al
	out	%al, %dx
	mov	$0x64, %dx
	mov	$0xfe, %al
	out	%al, %dx
1:	hlt
	jmp	1b
