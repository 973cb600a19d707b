//! The data path's batches: fixed slots, allocated once per thread and
//! reused, which the cores (`rx`, `tx`) fill and the I/O layer (`engine`)
//! empties: encrypted datagrams for the underlay (`SendBatch`) and
//! decrypted packets for the TUN (`PlainBatch`). Pure.
//!
//! A core never empties a batch: before each call the I/O layer makes the
//! room the call may fill (one slot per packet, `rx::REPLY_ROOM` per
//! datagram, `tx::TICK_ROOM` per peer tick), so the decisions stay free of
//! I/O and the batches still leave full.

use std::net::SocketAddr;

/// Slot size in both batches: the largest datagram nexd sends is an MTU
/// of 1,500 plus 32 bytes of WireGuard, and a decrypted packet is smaller
/// than the datagram it came in.
pub const SLOT: usize = 2048;

/// Encrypted datagrams waiting to be sent.
pub struct SendBatch {
    buf: Vec<u8>,
    lens: Vec<usize>,
    dests: Vec<SocketAddr>,
    capacity: usize,
}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        SendBatch {
            buf: vec![0; capacity * SLOT],
            lens: Vec::with_capacity(capacity),
            dests: Vec::with_capacity(capacity),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.lens.len() == self.capacity
    }

    /// Free slots.
    pub fn room(&self) -> usize {
        self.capacity - self.lens.len()
    }

    /// The next free slot (check `is_full` first), to be filled and then
    /// `commit`ted.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len().min(self.capacity - 1);
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// Takes the first `len` bytes of the slot `slot` returned.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        if !self.is_full() {
            self.lens.push(len.min(SLOT));
            self.dests.push(to);
        }
    }

    /// Copies `data` into the next slot. False when full or too large.
    pub fn push(&mut self, data: &[u8], to: SocketAddr) -> bool {
        if self.is_full() || data.len() > SLOT {
            return false;
        }
        self.slot()[..data.len()].copy_from_slice(data);
        self.commit(data.len(), to);
        true
    }

    pub fn clear(&mut self) {
        self.lens.clear();
        self.dests.clear();
    }

    /// Datagram `i` (below `len`).
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Where datagram `i` goes.
    pub fn dest(&self, i: usize) -> SocketAddr {
        self.dests[i]
    }
}

/// Decrypted packets waiting for the TUN.
pub struct PlainBatch {
    buf: Vec<u8>,
    lens: Vec<usize>,
    capacity: usize,
}

impl PlainBatch {
    pub fn new(capacity: usize) -> Self {
        PlainBatch {
            buf: vec![0; capacity * SLOT],
            lens: Vec::with_capacity(capacity),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_full(&self) -> bool {
        self.lens.len() == self.capacity
    }

    /// The next free slot (check `is_full` first), to be filled and then
    /// `commit`ted.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len().min(self.capacity - 1);
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// Takes the first `len` bytes of the slot `slot` returned.
    pub fn commit(&mut self, len: usize) {
        if !self.is_full() {
            self.lens.push(len.min(SLOT));
        }
    }

    /// Packet `i` (below `len`).
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.lens[i]]
    }

    pub fn clear(&mut self) {
        self.lens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batch_slots_fill_and_refuse_when_full() {
        let x: SocketAddr = "192.0.2.1:1".parse().expect("address");
        let mut b = SendBatch::new(2);
        assert!(b.push(&[1, 2, 3], x));
        assert_eq!(b.room(), 1);
        b.slot()[..2].copy_from_slice(&[9, 9]);
        b.commit(2, x);
        assert!(b.is_full());
        assert_eq!(b.room(), 0);
        assert!(!b.push(&[4], x));
        assert_eq!(b.datagram(0), &[1, 2, 3]);
        assert_eq!(b.datagram(1), &[9, 9]);
        assert_eq!(b.dest(1), x);
        assert!(!SendBatch::new(1).push(&[0; SLOT + 1], x));
    }

    #[test]
    fn plain_batch_slots_fill_and_ignore_commits_when_full() {
        let mut b = PlainBatch::new(2);
        b.slot()[..2].copy_from_slice(&[1, 2]);
        b.commit(2);
        b.slot()[..1].copy_from_slice(&[3]);
        b.commit(1);
        assert!(b.is_full());
        b.commit(5);
        assert_eq!(b.len(), 2);
        assert_eq!(b.packet(0), &[1, 2]);
        assert_eq!(b.packet(1), &[3]);
        b.clear();
        assert_eq!(b.len(), 0);
    }
}
