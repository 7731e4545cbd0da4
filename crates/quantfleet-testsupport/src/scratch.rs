//! Scratch directories for tests that hand files to a child process: one per call, removed on drop, so a test
//! run leaves nothing behind in the temp directory (passing or failing: the guard drops while unwinding).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory `<temp>/<prefix>-<pid>-<n>`, deleted with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `body` to `name` in this directory and returns its path.
    pub fn file(&self, name: &str, body: &str) -> std::io::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, body)?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_distinct_and_removed_on_drop() {
        let (a, b) = (ScratchDir::new("qf-scratch-test").unwrap(), ScratchDir::new("qf-scratch-test").unwrap());
        assert_ne!(a.path(), b.path());
        let file = a.file("x.yaml", "k: v\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "k: v\n");
        let dir = a.path().to_path_buf();
        drop(a);
        assert!(!dir.exists() && b.path().exists());
    }
}
