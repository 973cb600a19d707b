//! A classifier that does nothing: the floor the benchmarks measure the
//! real classifiers against (BPF_PROG_TEST_RUN overhead, call and return).

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::TC_NEXT;

#[classifier]
pub fn nexd_noop(_ctx: TcContext) -> i32 {
    TC_NEXT
}
