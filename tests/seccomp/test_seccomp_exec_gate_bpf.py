"""The exec gate's hand-written BPF, run through a small classic-BPF interpreter."""

from __future__ import annotations

import struct

import pytest

from firma.seccomp.exec_gate import gate_program

X86_64 = 0xC000003E
I386 = 0x40000003
ALLOW, EPERM, KILL = 0x7FFF0000, 0x00050001, 0x80000000
PTRS = (0x7F12_3456_7891, 0x5555_0000_1238, 0x1_0000_0008)


def run_bpf(prog: bytes, nr: int, arch: int, args=(0,) * 6) -> int:
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.fixture
def prog():
    return gate_program(X86_64, 59, 322, PTRS)


def test_exact_pointers_allow_execve(prog):
    assert run_bpf(prog, 59, X86_64, (*PTRS, 0, 0, 0)) == ALLOW


@pytest.mark.parametrize("i", range(3))
@pytest.mark.parametrize("delta", [1, 1 << 32, 1 << 40])
def test_any_other_pointer_denies(prog, i, delta):
    args = list(PTRS) + [0, 0, 0]
    args[i] ^= delta  # differs only in the low or only in the high word
    assert run_bpf(prog, 59, X86_64, args) == EPERM


def test_execveat_always_denied_and_others_allowed(prog):
    assert run_bpf(prog, 322, X86_64, (*PTRS, 0, 0, 0)) == EPERM
    assert run_bpf(prog, 39, X86_64) == ALLOW  # getpid


def test_foreign_arch_and_x32_killed(prog):
    assert run_bpf(prog, 11, I386, (*PTRS, 0, 0, 0)) == KILL
    assert run_bpf(prog, 0x40000000 | 520, X86_64, (*PTRS, 0, 0, 0)) == KILL
