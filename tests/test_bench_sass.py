"""benchmarks/sass_census.py's loop finder, on a hand-written SASS listing (the census itself
compiles for sm_90 and is run as a benchmark)."""

from __future__ import annotations

_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LOP3.LUT R8, R4, 0xe000e00, RZ, 0xc0, !PT ;
        /*0040*/                   HADD2.F32 R9, -RZ, R8.H0_H0 ;
        /*0050*/                   FFMA R10, R9, R11, R10 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0080*/                   FADD R12, R12, R13 ;
        /*0090*/              @!P1 BRA 0x70 ;
        /*00a0*/                   BRA 0xc0 ;
        /*00b0*/                   EXIT ;
"""


def test_main_loop_is_the_longest_backward_branch(benchmark_module):
    mod = benchmark_module("sass_census")
    loop = mod.main_loop(_SASS)
    # 0x20..0x60: five instructions, the forward BRA 0xc0 and the 3-instruction loop ignored.
    assert loop["instructions"] == 5
    assert loop["opcodes"] == {"LDG.E.128": 1, "LOP3.LUT": 1, "HADD2.F32": 1, "FFMA": 1,
                               "BRA": 1}
    assert loop["hot_path"] == 5  # no forward branch inside: every instruction runs
    assert mod.main_loop("no code") == {"instructions": 0, "hot_path": 0, "opcodes": {}}


# A row loop (0x10..0xd0) with a rare branch (0x40: over the rescale at 0x50..0x70), an
# if/else (0x80 to the else at 0xb0; the then-part ends in an unconditional BRA over it) and
# a two-predicate branch (0xc0) over nothing.
_COLD = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FMNMX R8, |R4|, |R5|, !PT ;
        /*0030*/                   FSETP.GEU.AND P0, PT, R8, 1e-30, PT ;
        /*0040*/               @P0 BRA 0x80 ;
        /*0050*/                   FMUL R4, R4, 1e30 ;
        /*0060*/                   FMUL R5, R5, 1e30 ;
        /*0070*/                   FMNMX R8, |R4|, |R5|, !PT ;
        /*0080*/               @P1 BRA 0xb0 ;
        /*0090*/                   FMUL R9, R4, R8 ;
        /*00a0*/                   BRA 0xc0 ;
        /*00b0*/                   FFMA R9, R4, R8, R5 ;
        /*00c0*/              @!P5 BRA !P4, 0xd0 ;
        /*00d0*/              @!P2 BRA 0x10 ;
        /*00e0*/                   EXIT ;
"""


def test_hot_path_skips_the_rare_branches(benchmark_module):
    loop = benchmark_module("sass_census").main_loop(_COLD)
    assert loop["instructions"] == 13  # 0x10..0xd0, every instruction in the listing
    # LDG, FMNMX, FSETP, @P0 BRA, @P1 BRA, FFMA, @!P5 BRA, @!P2 BRA: the rescale skipped, and
    # the else-part (one instruction) rather than the then-part and its jump (two).
    assert loop["hot_path"] == 8
