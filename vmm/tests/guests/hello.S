/* A 64-bit test guest: entered in long mode with flat segments and identity paging by
 * janus-vmm. Prints a line on COM1 (polling the line status register as a driver would), then
 * powers off through the ACPI sleep control register (SLP_TYP 5 | SLP_EN).
 * No SSE, no int3, no `int n`: this machine's KVM cannot run them in kernel mode. */
	.code64
	.globl _start
	.text
_start:
	lea	msg(%rip), %rsi
next:
	movb	(%rsi), %bl
	test	%bl, %bl
	jz	done
wait_thre:
	mov	$0x3fd, %dx		/* LSR */
	in	%dx, %al
	test	$0x20, %al		/* THR empty */
	jz	wait_thre
	mov	$0x3f8, %dx
	mov	%bl, %al
	out	%al, %dx
	inc	%rsi
	jmp	next
done:
	mov	$0x600, %dx
	mov	$0x34, %al
	out	%al, %dx
halt:
	hlt
	jmp	halt

	.section .rodata
msg:
	.asciz	"janus-testguest: hello from long mode\n"
