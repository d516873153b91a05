/* Bench guest: reads the first virtio-mmio device's magic register 200000 times (an MMIO
 * exit each), checks the value, then powers off. */
	.code64
	.globl _start
	.text
_start:
	mov	$200000, %ecx
	mov	$0xd0000000, %esi
1:	mov	(%rsi), %eax
	cmp	$0x74726976, %eax
	jne	bad
	dec	%ecx
	jnz	1b
	mov	$0x600, %dx
	mov	$0x34, %al
	out	%al, %dx
bad:
	mov	$0x3f8, %dx
	mov	$'X', %al
	out	%al, %dx
2:	hlt
	jmp	2b
