//! JSONL manifests: one `{"prompt", "chosen", "rejected", "category"?, "scores"?}` object per
//! line, image paths relative to the manifest's folder (absolute paths are kept); `scores` is
//! `[x, y]`, `{"chosen": x, "rejected": y}` or several of those keyed by scorer name
//! ([`PairScores`]). Blank lines are skipped; a line that is not such an object is an error naming
//! the line, and a line whose image file does not exist is skipped and counted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Cursor, ImageSource, PairScores, PreferencePair, Record, Verdict};
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Line {
    #[serde(alias = "caption")]
    prompt: String,
    chosen: String,
    rejected: String,
    #[serde(default)]
    category: Option<String>,
    // Read as JSON and parsed by `PairScores::from_json`, whose errors name the scorer.
    #[serde(default)]
    scores: serde_json::Value,
}

/// One parsed manifest line.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestLine {
    pub prompt: String,
    /// The image paths as written (relative to the manifest's folder, or absolute).
    pub chosen: String,
    pub rejected: String,
    pub category: Option<String>,
    pub scores: Option<PairScores>,
    /// The whole object, unknown keys included, for tools that rewrite manifests.
    pub raw: serde_json::Map<String, serde_json::Value>,
}

/// Parses line `line` (1-based, for messages) of the manifest `path`; errors name both.
pub fn parse_line(path: &Path, line: u64, text: &str) -> Result<ManifestLine> {
    let err = |msg: String| Error::File { path: path.to_path_buf(), msg: format!("line {line}: {msg}") };
    let not_pair =
        |e: serde_json::Error| err(format!("not a pair object {{prompt, chosen, rejected, category?, scores?}}: {e}"));
    // Parsed as a map first: a derived struct would also accept a JSON array.
    let v = serde_json::Value::Object(serde_json::from_str(text).map_err(not_pair)?);
    let l = Line::deserialize(&v).map_err(not_pair)?;
    let serde_json::Value::Object(raw) = v else { return Err(err("not a JSON object".into())) };
    let scores = PairScores::from_json(&l.scores).map_err(err)?;
    Ok(ManifestLine { prompt: l.prompt, chosen: l.chosen, rejected: l.rejected, category: l.category, scores, raw })
}

/// Reads the records of a manifest line by line; see [`super::PairStream`].
pub struct JsonlReader {
    path: PathBuf,
    base: PathBuf,
    reader: BufReader<File>,
    /// Lines read so far (blank ones included), and the byte offset after them.
    line: u64,
    offset: u64,
    buf: String,
}

impl JsonlReader {
    /// Opens `path` after `line` lines, which end at byte `offset` (0, 0: the start).
    pub fn open(path: &Path, line: u64, offset: u64) -> Result<JsonlReader> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad_cursor = |why: &str| {
            Error::Invalid(format!(
                "data cursor (line {line}, byte {offset}) does not fit {}: {why}; resume on the same manifest",
                path.display()
            ))
        };
        if offset > len {
            return Err(bad_cursor(&format!("the file has {len} bytes")));
        }
        if offset > 0 {
            // A saved offset always follows a newline (or ends the file); anything else means
            // the manifest changed since the cursor was saved.
            let mut b = [0u8; 1];
            f.seek(SeekFrom::Start(offset - 1)).and_then(|_| f.read_exact(&mut b)).map_err(|e| Error::io(path, e))?;
            if b[0] != b'\n' && offset != len {
                return Err(bad_cursor("that byte is not the start of a line"));
            }
        }
        f.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(path, e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(JsonlReader { path: path.to_path_buf(), base, reader: BufReader::new(f), line, offset, buf: String::new() })
    }

    pub fn cursor(&self) -> Cursor {
        Cursor::Jsonl { line: self.line, offset: self.offset }
    }

    pub fn next_record(&mut self) -> Option<Result<Record>> {
        loop {
            self.buf.clear();
            let cursor = self.cursor();
            let n = match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => {
                    let msg = format!("line {}: {e}", self.line + 1);
                    return Some(Err(Error::File { path: self.path.clone(), msg }));
                }
            };
            let index = self.line;
            self.line += 1;
            self.offset += n as u64;
            let text = self.buf.trim();
            if text.is_empty() {
                continue;
            }
            return Some(self.record(text, index, cursor));
        }
    }

    fn record(&self, text: &str, index: u64, cursor: Cursor) -> Result<Record> {
        let l = parse_line(&self.path, index + 1, text)?;
        let (chosen, rejected) = (self.base.join(&l.chosen), self.base.join(&l.rejected));
        if !chosen.is_file() || !rejected.is_file() {
            let (verdict, category) = (Verdict::MissingImage, l.category);
            return Ok(Record { index, cursor, verdict, chosen_column: None, category, pair: None });
        }
        let pair = PreferencePair {
            index,
            prompt: l.prompt,
            chosen: ImageSource::File(chosen),
            rejected: ImageSource::File(rejected),
            category: l.category.clone(),
            scores: l.scores.and_then(|s| s.single()),
            tie: false,
            cursor: cursor.clone(),
        };
        Ok(Record {
            index,
            cursor,
            verdict: Verdict::Pair,
            chosen_column: None,
            category: l.category,
            pair: Some(pair),
        })
    }
}
