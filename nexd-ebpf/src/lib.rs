//! Empty library target: it lets `nexd-agent` name this crate as a
//! build-dependency, so cargo reruns the agent's build script (which builds
//! the real eBPF binary) whenever this crate changes.
#![no_std]
