//! [`Captured`]: a shared buffer to point a tracing subscriber's writer at, so that a test can
//! read what was logged.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// What was written to it, shared by its clones (`with_writer(move || captured.clone())`).
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a line of the test's own (output it checks along with the logs).
    pub fn note(&self, text: impl AsRef<str>) {
        let mut bytes = self.bytes();
        bytes.extend_from_slice(text.as_ref().as_bytes());
        bytes.push(b'\n');
    }

    /// Everything written so far.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// What was written since the last `take`, removed.
    #[must_use]
    pub fn take(&self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *self.bytes())).into_owned()
    }
}
