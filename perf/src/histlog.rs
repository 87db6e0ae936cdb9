//! `--hist FILE`: an HdrHistogram interval log, one interval a second per
//! direction (tags `read` and `write`), V2 compressed histograms with
//! StartTime/BaseTime headers, as the Java and Python HdrHistogram tools
//! read them.
//!
//! ```text
//!  IO thread (per core)                          main thread
//!   records into cur.read / cur.write
//!   at each 1 s boundary: takes a spare  <-- spare (reset, returned)
//!   swaps, try_sends the full one        --> full: merged with the other
//!   (no lock, no allocation: SPARES            cores' same second, written
//!    pre-allocated per core, channels          once every core is past it
//!    bounded to never be full)
//! ```
//! With no spare back yet (the main thread behind), the IO thread keeps
//! recording into the interval it has: that interval runs longer, nothing
//! is lost.

use crate::progress::Seconds;
use crate::report::histogram;
use base64::Engine as _;
use hdrhistogram::serialization::interval_log::{
    IntervalLogHistogram, IntervalLogIterator, IntervalLogWriter, IntervalLogWriterBuilder,
    LogEntry, Tag,
};
use hdrhistogram::serialization::{Deserializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use minstant::Instant;
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// Interval histograms per core: the one recording, and spares.
const SPARES: usize = 3;

/// One core's latencies over one interval.
pub struct Interval {
    core: usize,
    /// Whole seconds since the core started measuring, at its start.
    index: u64,
    start: Duration,
    end: Duration,
    /// Read latencies, ns.
    pub read: Histogram<u64>,
    /// Write latencies, ns.
    pub write: Histogram<u64>,
}

/// The IO thread's end.
pub struct CoreLog {
    cur: Option<Interval>,
    spare: Receiver<Interval>,
    full: SyncSender<Interval>,
    /// Seconds boundaries passed so far (the progress line's too).
    seconds: Seconds,
}

impl CoreLog {
    /// The interval recording now (None until measuring starts).
    pub fn cur(&mut self) -> Option<&mut Interval> {
        if self.seconds.t0().is_some() {
            self.cur.as_mut()
        } else {
            None
        }
    }

    /// Called by the IO thread each loop while measuring: starts the first
    /// interval, and hands a full one over at each second.
    pub fn tick(&mut self, now: Instant) {
        if self.seconds.tick(now) == 0 {
            return;
        }
        let Ok(mut fresh) = self.spare.try_recv() else {
            return; // keep recording into this one
        };
        let at = self.since_t0(now);
        fresh.index = self.seconds.secs();
        fresh.start = at;
        if let Some(mut full) = self.cur.replace(fresh) {
            full.end = at;
            self.send(full);
        }
    }

    /// Hands over the last interval (measuring is over).
    pub fn finish(&mut self, now: Instant) {
        if let (Some(_), Some(mut last)) = (self.seconds.t0(), self.cur.take()) {
            last.end = self.since_t0(now);
            self.send(last);
        }
    }

    fn since_t0(&self, now: Instant) -> Duration {
        self.seconds
            .t0()
            .map_or(Duration::ZERO, |t0| now.duration_since(t0))
    }

    fn send(&mut self, iv: Interval) {
        match self.full.try_send(iv) {
            Ok(()) => {}
            // Cannot happen (the channel holds every interval there is);
            // keep the counts rather than lose them.
            Err(TrySendError::Full(iv) | TrySendError::Disconnected(iv)) => {
                if let Some(c) = self.cur.as_mut() {
                    let _ = c.read.add(&iv.read);
                    let _ = c.write.add(&iv.write);
                }
            }
        }
    }
}

/// The main thread's end: merges the cores' intervals and writes the log.
pub struct MainLog {
    full: Receiver<Interval>,
    spares: Vec<SyncSender<Interval>>,
    /// Per core: the index of the last interval received.
    seen: Vec<Option<u64>>,
    pending: BTreeMap<u64, Merged>,
    file: std::fs::File,
    path: std::path::PathBuf,
}

struct Merged {
    start: Duration,
    end: Duration,
    read: Histogram<u64>,
    write: Histogram<u64>,
}

/// Creates the log file and sets up `cores` IO-side ends and the main end.
pub fn channels(cores: usize, path: &std::path::Path) -> Result<(Vec<CoreLog>, MainLog), String> {
    let file =
        std::fs::File::create(path).map_err(|e| format!("--hist {}: {e}", path.display()))?;
    let (full_tx, full_rx) = sync_channel(cores * SPARES);
    let mut ends = Vec::new();
    let mut spares = Vec::new();
    for core in 0..cores {
        let (tx, rx) = sync_channel(SPARES);
        for _ in 1..SPARES {
            let _ = tx.try_send(empty(core));
        }
        spares.push(tx);
        ends.push(CoreLog {
            cur: Some(empty(core)),
            spare: rx,
            full: full_tx.clone(),
            seconds: Seconds::default(),
        });
    }
    let main = MainLog {
        full: full_rx,
        spares,
        seen: vec![None; cores],
        pending: BTreeMap::new(),
        file,
        path: path.to_path_buf(),
    };
    Ok((ends, main))
}

fn empty(core: usize) -> Interval {
    Interval {
        core,
        index: 0,
        start: Duration::ZERO,
        end: Duration::ZERO,
        read: histogram(),
        write: histogram(),
    }
}

impl MainLog {
    /// Writes the headers: measuring started at `start`, the intervals'
    /// timestamps count from there.
    pub fn begin(&mut self, start: std::time::SystemTime) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut ser = V2DeflateSerializer::new();
        IntervalLogWriterBuilder::new()
            .add_comment("rtrs-perf: completion latency in ns, one interval a second per direction")
            .with_start_time(start)
            .with_base_time(start)
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut buf, &mut ser)
            .map_err(|e| e.to_string())?;
        self.put(&buf)
    }

    fn put(&mut self, buf: &[u8]) -> Result<(), String> {
        use std::io::Write;
        self.file
            .write_all(buf)
            .map_err(|e| format!("--hist {}: {e}", self.path.display()))
    }

    /// Takes what the cores handed over, returns their spares, and writes
    /// the seconds every core is past.
    pub fn drain(&mut self) -> Result<(), String> {
        while let Ok(mut iv) = self.full.try_recv() {
            let m = self.pending.entry(iv.index).or_insert_with(|| Merged {
                start: iv.start,
                end: iv.end,
                read: histogram(),
                write: histogram(),
            });
            m.start = m.start.min(iv.start);
            m.end = m.end.max(iv.end);
            let _ = m.read.add(&iv.read);
            let _ = m.write.add(&iv.write);
            self.seen[iv.core] = Some(iv.index);
            iv.read.reset();
            iv.write.reset();
            let _ = self.spares[iv.core].try_send(iv);
        }
        let done = self.seen.iter().map(|s| s.unwrap_or(0)).min().unwrap_or(0);
        // Every core has sent an interval that started at `done` or later:
        // the seconds before are complete.
        while let Some(e) = self.pending.first_entry() {
            if *e.key() >= done {
                break;
            }
            let m = e.remove();
            self.emit(&m)?;
        }
        Ok(())
    }

    /// Writes everything received (call once the IO threads are done).
    pub fn finish(mut self) -> Result<(), String> {
        self.drain()?;
        for m in std::mem::take(&mut self.pending).into_values() {
            self.emit(&m)?;
        }
        Ok(())
    }

    fn emit(&mut self, m: &Merged) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut ser = V2DeflateSerializer::new();
        // A writer with no headers: the lines of this interval only.
        let mut log: IntervalLogWriter<'_, '_, _, _> = IntervalLogWriterBuilder::new()
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut buf, &mut ser)
            .map_err(|e| e.to_string())?;
        for (tag, h) in [("read", &m.read), ("write", &m.write)] {
            if !h.is_empty() {
                log.write_histogram(h, m.start, m.end.saturating_sub(m.start), Tag::new(tag))
                    .map_err(|e| e.to_string())?;
            }
        }
        self.put(&buf)
    }
}

/// One interval read back from a log.
pub struct Read {
    pub tag: Option<String>,
    pub start: Duration,
    pub duration: Duration,
    pub hist: Histogram<u64>,
}

/// Reads an interval log back (the tests, and `rtrs-perf plot`).
pub fn read(text: &[u8]) -> Result<Vec<Read>, String> {
    let mut d = Deserializer::new();
    let mut v = Vec::new();
    for e in IntervalLogIterator::new(text) {
        match e.map_err(|e| format!("not an interval log: {e:?}"))? {
            LogEntry::Interval(h) => v.push(decode(&mut d, &h)?),
            LogEntry::StartTime(_) | LogEntry::BaseTime(_) => {}
        }
    }
    Ok(v)
}

fn decode(d: &mut Deserializer, h: &IntervalLogHistogram<'_>) -> Result<Read, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(h.encoded_histogram().trim())
        .map_err(|e| format!("a histogram that is not base64: {e}"))?;
    let hist: Histogram<u64> = d
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("a histogram that does not decode: {e:?}"))?;
    Ok(Read {
        tag: h.tag().map(|t| t.as_str().to_string()),
        start: h.start_timestamp(),
        duration: h.duration(),
        hist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_of_two_cores_merge_by_second_and_read_back() {
        let path = std::env::temp_dir().join(format!("histlog-unit-{}.hlog", std::process::id()));
        let (mut cores, mut main) = channels(2, &path).unwrap();
        main.begin(std::time::SystemTime::now()).unwrap();
        let t0 = Instant::now();
        let mut total = 0u64;
        // Core 0 records 3 s with a read and a write a second; core 1 1.5 s.
        for (c, secs) in [(0usize, 3u64), (1, 1)] {
            for s in 0..=secs {
                let now = t0 + Duration::from_millis(s * 1000 + 10);
                cores[c].tick(now);
                let iv = cores[c].cur().unwrap();
                iv.read.record(1000 + s).unwrap();
                iv.write.record(2000).unwrap();
                total += 2;
                main.drain().unwrap();
            }
            cores[c].finish(t0 + Duration::from_millis(secs * 1000 + 500));
        }
        main.finish().unwrap();
        let text = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let s = String::from_utf8_lossy(&text);
        assert!(
            s.contains("#[StartTime: ") && s.contains("#[BaseTime: "),
            "{s}"
        );
        let v = read(&text).unwrap();
        let sum: u64 = v.iter().map(|r| r.hist.len()).sum();
        assert_eq!(sum, total, "{s}");
        let reads: Vec<&Read> = v
            .iter()
            .filter(|r| r.tag.as_deref() == Some("read"))
            .collect();
        assert_eq!(reads.len(), 4, "one a second: {s}");
        assert_eq!(
            reads[0].hist.len() + reads[1].hist.len(),
            4,
            "both cores in 0 and 1"
        );
        assert!(
            reads.windows(2).all(|w| w[0].start < w[1].start),
            "in order"
        );
        assert!(s.contains("HISTFAAA"), "V2 compressed: {s}");
    }
}
