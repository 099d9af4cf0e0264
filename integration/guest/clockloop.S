; clockloop: the guest every clockvmm vCPU runs (16-bit real mode, CS = DS = 0, loaded at 0x1000).
; The VMM sets, per vCPU: ESI = pvclock gpa | 1, BX = the vCPU's 16-byte sample slot.
; Assemble with `nasm -f bin` to check the bytes against GUEST_CODE in src/vm.rs.
bits 16
org 0x1000
        mov ecx, 0x4b564d01      ; 66 B9 01 4D 56 4B   MSR_KVM_SYSTEM_TIME_NEW
        mov eax, esi             ; 66 89 F0            pvclock gpa | enable bit
        xor edx, edx             ; 66 31 D2
        wrmsr                    ; 0F 30               enable kvmclock
sample:
        rdtsc                    ; 0F 31               EDX:EAX = guest TSC
        mov [bx], eax            ; 66 89 07            slot+0: TSC low
        mov [bx+4], edx          ; 66 89 57 04         slot+4: TSC high
        inc dword [bx+8]         ; 66 FF 47 08         slot+8: sample counter
        out 0x10, al             ; E6 10               exit to the VMM
        jmp sample               ; EB EF
