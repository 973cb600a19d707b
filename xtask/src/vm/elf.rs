//! What an ELF executable needs at run time (its dynamic loader and shared
//! libraries), found inside a Debian tree of any architecture: `readelf`
//! reads foreign ELF files, where `ldd` would have to run them.

use std::{
    collections::BTreeSet,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The interpreter and the NEEDED entries in `readelf --wide -l -d` output.
fn parse_readelf(text: &str) -> (Option<String>, Vec<String>) {
    let mut interp = None;
    let mut needed = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Requesting program interpreter: ").nth(1) {
            interp = rest.split(']').next().map(str::to_owned);
        } else if line.contains("(NEEDED)")
            && let Some(lib) = line.split("Shared library: [").nth(1)
        {
            needed.extend(lib.split(']').next().map(str::to_owned));
        }
    }
    (interp, needed)
}

/// The interpreter and the libraries `file` names directly.
fn direct_needs(file: &Path) -> anyhow::Result<(Option<String>, Vec<String>)> {
    let out = Command::new("readelf")
        .args(["--wide", "-l", "-d"])
        .arg(file)
        .output()
        .context("cannot run readelf")?;
    if !out.status.success() {
        bail!(
            "readelf {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_readelf(&String::from_utf8_lossy(&out.stdout)))
}

/// `path` (absolute inside the tree at `root`) with every symbolic link
/// resolved inside the tree, absolute targets taken relative to `root`:
/// the tree's links must not lead to the host's files.
pub fn resolve(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let candidate = done
            .iter()
            .fold(root.to_path_buf(), |p, d| p.join(d))
            .join(&c);
        match std::fs::read_link(&candidate) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    bail!("too many symbolic links resolving {path}");
                }
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    done.clear();
                }
                for t in components(&target).into_iter().rev() {
                    pending.push(t);
                }
            }
            Err(_) => done.push(c),
        }
    }
    Ok(done.iter().fold(root.to_path_buf(), |p, d| p.join(d)))
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            _ => None,
        })
        .collect()
}

/// Every file (absolute paths inside the tree) that `file` needs to run:
/// its dynamic loader and its shared libraries, transitively, searched in
/// Debian's library directories for `triple`.
pub fn runtime_needs(root: &Path, triple: &str, file: &Path) -> anyhow::Result<BTreeSet<String>> {
    let dirs = [
        format!("/lib/{triple}"),
        format!("/usr/lib/{triple}"),
        "/lib64".to_owned(),
        "/lib".to_owned(),
        "/usr/lib".to_owned(),
    ];
    let mut found = BTreeSet::new();
    let mut queue = vec![file.to_path_buf()];
    let mut seen_libs = BTreeSet::new();
    while let Some(f) = queue.pop() {
        let (interp, needed) = direct_needs(&f)?;
        if let Some(i) = interp
            && found.insert(i.clone())
        {
            queue.push(resolve(root, &i)?);
        }
        for lib in needed {
            if !seen_libs.insert(lib.clone()) {
                continue;
            }
            let hit = dirs
                .iter()
                .map(|d| format!("{d}/{lib}"))
                .find(|p| resolve(root, p).is_ok_and(|r| r.is_file()))
                .with_context(|| {
                    format!(
                        "{} needs {lib}, which is not in {}",
                        f.display(),
                        root.display()
                    )
                })?;
            queue.push(resolve(root, &hit)?);
            found.insert(hit);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readelf_output_is_parsed() {
        let text = "
Program Headers:
  INTERP         0x000318 0x0000000000000318 0x0000000000000318 0x00001b 0x00001b R   0x1
      [Requesting program interpreter: /lib/ld-linux-aarch64.so.1]
Dynamic section at offset 0x2dc8 contains 27 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libmnl.so.0]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000c (INIT)               0x2000
";
        let (interp, needed) = parse_readelf(text);
        assert_eq!(interp.as_deref(), Some("/lib/ld-linux-aarch64.so.1"));
        assert_eq!(needed, ["libmnl.so.0", "libc.so.6"]);
    }

    #[test]
    fn links_resolve_inside_the_tree() {
        let root = std::env::temp_dir().join(format!("nexd-elf-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("lib/aarch64-linux-gnu")).expect("mkdir");
        std::fs::write(root.join("lib/aarch64-linux-gnu/ld-2.36.so"), b"x").expect("write");
        // An absolute target must stay inside the tree, a relative one
        // resolves from the link's directory.
        std::os::unix::fs::symlink(
            "/lib/aarch64-linux-gnu/ld-2.36.so",
            root.join("lib/ld-linux-aarch64.so.1"),
        )
        .expect("link");
        std::os::unix::fs::symlink("lib", root.join("usrlib")).expect("link");
        std::os::unix::fs::symlink(
            "../ld-linux-aarch64.so.1",
            root.join("lib/aarch64-linux-gnu/up"),
        )
        .expect("link");
        let want = root.join("lib/aarch64-linux-gnu/ld-2.36.so");
        assert_eq!(
            resolve(&root, "/lib/ld-linux-aarch64.so.1").expect("resolve"),
            want
        );
        assert_eq!(
            resolve(&root, "/usrlib/ld-linux-aarch64.so.1").expect("resolve"),
            want
        );
        assert_eq!(
            resolve(&root, "/lib/aarch64-linux-gnu/up").expect("resolve"),
            want
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
