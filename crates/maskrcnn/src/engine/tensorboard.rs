//! A small TensorBoard event-file writer for scalars: TFRecord framing
//! (length, masked CRC-32C, payload, masked CRC-32C) around `Event` protocol
//! buffers (`wall_time`, `step`, `file_version` or `summary { value { tag,
//! simple_value } }`), encoded by hand: no protobuf dependency.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends scalar events to `DIR/events.out.tfevents.<seconds>.<host>`.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Creates the event file in `dir` (made if missing) with the version
    /// record TensorBoard expects first.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{}", now.as_secs(), host.trim()));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut w = EventWriter { path, file };
        let mut event = Vec::new();
        put_double(&mut event, 1, now.as_secs_f64());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.file.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar `value` of `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> std::io::Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_key(&mut summary_value, 2, 5);
        summary_value.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::new();
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        put_double(&mut event, 1, wall.as_secs_f64());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Makes everything written so far visible to TensorBoard.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc32c(data).to_le_bytes())
    }
}

/// Rewrites every event file in `dir` (atomically, where anything
/// changes) without the events of steps after `step`: what an interrupted
/// run logged past the checkpoint a resumed run starts from. A torn record
/// at a file's end (a process killed mid-write) goes as well.
pub fn drop_events_after(dir: &Path, step: i64) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let mut kept = Vec::with_capacity(bytes.len());
        let mut at = 0usize;
        while at + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default()) as usize;
            let end = at.saturating_add(12).saturating_add(len).saturating_add(4);
            if end > bytes.len() {
                break;
            }
            if event_step(&bytes[at + 12..at + 12 + len]).is_none_or(|s| s <= step) {
                kept.extend_from_slice(&bytes[at..end]);
            }
            at = end;
        }
        if kept.len() != bytes.len() {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &kept)?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    Ok(())
}

/// The `step` (field 2) of an `Event` message, if it has one.
fn event_step(mut m: &[u8]) -> Option<i64> {
    fn varint(m: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = m.split_first()?;
            *m = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    while !m.is_empty() {
        let key = varint(&mut m)?;
        let skip = match (key >> 3, key & 7) {
            (2, 0) => return varint(&mut m).map(|v| v as i64),
            (_, 0) => {
                varint(&mut m)?;
                0
            }
            (_, 1) => 8,
            (_, 2) => varint(&mut m)? as usize,
            (_, 5) => 4,
            _ => return None,
        };
        m = m.get(skip..)?;
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    put_varint(out, u64::from(field << 3 | wire_type));
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *entry = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod resume_tests {
    use super::*;

    /// Events of steps past a resume point are dropped, everything else
    /// (the version record, earlier steps) kept byte for byte.
    #[test]
    fn events_after_a_step_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for step in 1..=6 {
            w.scalar("loss", step, step as f32).unwrap();
        }
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let before = std::fs::read(&path).unwrap();
        drop_events_after(dir.path(), 3).unwrap();
        let after = std::fs::read(&path).unwrap();
        let steps = |bytes: &[u8]| {
            let mut out = Vec::new();
            let mut at = 0;
            while at + 12 <= bytes.len() {
                let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
                out.push(event_step(&bytes[at + 12..at + 12 + len]));
                at += 16 + len;
            }
            out
        };
        assert_eq!(steps(&before), [None, Some(1), Some(2), Some(3), Some(4), Some(5), Some(6)]);
        assert_eq!(steps(&after), [None, Some(1), Some(2), Some(3)]);
        assert!(before.starts_with(&after), "kept records unchanged");
    }
}
