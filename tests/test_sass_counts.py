"""scripts/sass_counts.py's reading of a SASS listing: the step's loop, the span of its products, the loop's tail after
its last barrier, the products' count, the instructions per prototype copy and the loop of the other pass over z."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sass_counts", ROOT / "scripts" / "sass_counts.py")
sass_counts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_counts)

# An outer loop (0x10 to 0xc0) around an inner one (0x20 to 0xa0) whose first block is taken only now and then.
LISTING = """
        Function : _Z19forward_rows_kernelv
        .text._Z19forward_rows_kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P2, PT, R0, 0x1, PT ;              /* 0x000fe20003f46270 */
        /*0020*/                   LDS R2, [R3] ;                                  /* 0x000e220000000800 */
        /*0030*/              @P0 BRA 0x60 ;                                       /* 0x0000000000000947 */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ;   /* 0x0000000006047fae */
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                   /* 0x0000000000007b1d */
        /*0060*/                   FADD R5, R2, -R3 ;                              /* 0x8000000302057221 */
        /*0070*/                   HMMA.1688.F32.TF32 R8, R12, R14, R8 ;           /* 0x0000000e0c08723c */
        /*0080*/                   HMMA.1688.F32.TF32 R8, R12, R15, R8 ;           /* 0x0000000f0c08723c */
        /*0090*/                   IADD3 R0, R0, 0x1, RZ ;                         /* 0x0000000100007810 */
        /*00a0*/              @!P1 BRA 0x20 ;                                      /* 0xfffffff000009947 */
        /*00b0*/                   IADD3 R9, R9, 0x1, RZ ;                         /* 0x0000000109097810 */
        /*00c0*/              @!P2 BRA 0x10 ;                                      /* 0xfffffff000009947 */
        /*00d0*/                   EXIT ;                                          /* 0x000000000000794d */
        Function : _Z14other_kernelv
        /*0000*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_step_counts_of_the_innermost_loop_around_the_products():
    listing = sass_counts.functions(LISTING)
    assert list(listing) == ["_Z19forward_rows_kernelv", "_Z14other_kernelv"]
    assert len(listing["_Z19forward_rows_kernelv"]) == 14
    # loop: 0x20 to 0xa0; span: from the branch target 0x60 to the back branch at 0xa0; tail: after the barrier at 0x50
    assert sass_counts.step_counts(listing["_Z19forward_rows_kernelv"]) == {
        "loop": 9, "span": 5, "tail": 5, "hmma": 2, "copy": None, "pass": None}
    assert sass_counts.step_counts(listing["_Z14other_kernelv"]) is None


# A step's loop (0x10 to 0xa0) around a loop of prototype copies (0x20 to 0x70): two copies that may zero-fill, each
# two LDGSTS under opposite predicates, in six instructions.
COPYING = """
        Function : _Z11backward_kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P2, PT, R0, 0x1, PT ;              /* 0x000fe20003f46270 */
        /*0020*/                   ISETP.GE.AND P3, PT, R4, R5, PT ;               /* 0x000fe20003f46270 */
        /*0030*/               @P3 LDGSTS.E.BYPASS.128 [R9], desc[UR36][R6.64], !PT ; /* 0x0000000006092fae */
        /*0040*/              @!P3 LDGSTS.E.BYPASS.128 [R9], desc[UR36][R6.64] ;   /* 0x000000000609afae */
        /*0050*/               @P3 LDGSTS.E.BYPASS.128 [R9+0x1000], desc[UR36][R6.64], !PT ; /* 0x0000000006092fae */
        /*0060*/              @!P3 LDGSTS.E.BYPASS.128 [R9+0x1000], desc[UR36][R6.64] ; /* 0x000000000609afae */
        /*0070*/              @!P1 BRA 0x20 ;                                      /* 0xfffffff000009947 */
        /*0080*/                   HMMA.1688.F32.TF32 R8, R12, R14, R8 ;           /* 0x0000000e0c08723c */
        /*0090*/                   IADD3 R0, R0, 0x1, RZ ;                         /* 0x0000000100007810 */
        /*00a0*/              @!P2 BRA 0x10 ;                                      /* 0xfffffff000009947 */
        /*00b0*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_step_counts_of_the_prototype_copies_inside_the_step():
    counts = sass_counts.step_counts(sass_counts.functions(COPYING)["_Z11backward_kernelv"])
    assert counts == {"loop": 10, "span": 3, "tail": 10, "hmma": 1, "copy": 3.0, "pass": None}


def test_other_pass_is_the_innermost_loop_that_loads_and_computes_without_the_tensor_cores():
    def line(address, text):
        return f"        /*{address:04x}*/                   {text} ;       /* 0x0000000e0c08723c */"

    def loads_and_computes(start, ffma):
        return [line(start, "LDG.E.128 R4, desc[UR36][R2.64]")] + [
            line(start + 16 * (i + 1), "FFMA R8, R12, R14, R8") for i in range(ffma)]

    lines = ["        Function : _Z19forward_rows_kernelv", line(0x0, "HMMA.1688.F32.TF32 R8, R12, R14, R8")]
    lines += loads_and_computes(0x10, 16) + [line(0x120, "@!P1 BRA 0x0")]
    lines += loads_and_computes(0x130, 16) + [line(0x240, "FADD R8, R8, R9"), line(0x250, "FADD R8, R8, R9"),
                                              line(0x260, "@!P2 BRA 0x130"), line(0x270, "@!P3 BRA 0x130")]
    lines += loads_and_computes(0x280, 1) + [line(0x2a0, "@!P4 BRA 0x280"), line(0x2b0, "@!P5 BRA 0x0")]
    counts = sass_counts.step_counts(sass_counts.functions("\n".join(lines))["_Z19forward_rows_kernelv"])
    # The step's loop (0x0 to 0x120, 19 instructions) loads and has 16 FFMA, but the tensor cores too. Of the other
    # loops that load: 0x130 to 0x260 has 16 FFMA in 20 instructions; 0x130 to 0x270 too, around it; 0x280 to 0x2a0
    # is shorter but has one FFMA; the loop around all has the HMMA.
    assert counts["loop"] == 19 and counts["pass"] == 20


def test_ptxas_resources():
    report = ("ptxas info    : Compiling entry function '_Z1av' for 'sm_90'\n"
              "ptxas info    : Used 218 registers, used 1 barriers, 528 bytes cmem[0]\n"
              "ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'\n"
              "    1020 bytes stack frame, 1020 bytes spill stores, 892 bytes spill loads\n"
              "ptxas info    : Used 255 registers, 528 bytes cmem[0]\n")
    assert sass_counts.ptxas_resources(report) == {"_Z1av": (218, 0), "_Z1bv": (255, 1020)}
