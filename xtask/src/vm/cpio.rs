//! A minimal writer of "newc" cpio archives, the format the kernel unpacks
//! as its initramfs (no external `cpio` needed).

use std::io::Write;

/// Who owns an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };
}

/// An archive being written.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio { out, ino: 1 }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize) -> std::io::Result<()> {
        self.header_owned(name, mode, Owner::ROOT, size)
    }

    fn header_owned(
        &mut self,
        name: &str,
        mode: u32,
        owner: Owner,
        size: usize,
    ) -> std::io::Result<()> {
        let namesize = name.len() + 1;
        write!(
            self.out,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, owner.uid, owner.gid, 1, 0, size, 0, 0, 0, 0, namesize, 0
        )?;
        self.ino += 1;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        // Header (110 bytes) plus name is padded to 4.
        let pad = (4 - (110 + namesize) % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    fn data(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(data)?;
        let pad = (4 - data.len() % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.header(name, 0o040755, 0)
    }

    /// A regular file with `mode` permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.header(name, 0o100000 | (mode & 0o7777), data.len())?;
        self.data(data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> std::io::Result<()> {
        self.header(name, 0o120777, target.len())?;
        self.data(target.as_bytes())
    }

    /// Any entry with its full mode (type and permission bits) and owner:
    /// a file's contents, a link's target, nothing for a directory.
    pub fn entry(
        &mut self,
        name: &str,
        mode: u32,
        owner: Owner,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.header_owned(name, mode, owner, data.len())?;
        self.data(data)
    }

    /// Ends the archive.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_four_byte_aligned() {
        let mut c = Cpio::new(Vec::new());
        c.dir("bin").expect("dir");
        c.file("bin/x", 0o755, b"hello").expect("file");
        c.symlink("sh", "bin/x").expect("link");
        let out = c.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn entries_carry_mode_and_owner() {
        let mut c = Cpio::new(Vec::new());
        c.entry("etc/shadow", 0o100640, Owner { uid: 0, gid: 42 }, b"x")
            .expect("entry");
        let out = c.finish().expect("finish");
        // mode, uid, gid: the 2nd, 3rd and 4th 8-digit hex fields.
        assert_eq!(&out[14..38], b"000081a0000000000000002a");
    }
}
