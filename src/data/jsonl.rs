//! JSONL manifests: one `{"prompt", "chosen", "rejected", "category"?, "scores"?}` object per
//! line, image paths relative to the manifest's folder (absolute paths are kept). Blank lines
//! are skipped; a line that is not such an object is an error naming the line, and a line whose
//! image file does not exist is skipped and counted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Cursor, ImageSource, PreferencePair, Record, Scores, Verdict};
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Line {
    #[serde(alias = "caption")]
    prompt: String,
    chosen: String,
    rejected: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    scores: Option<Scores>,
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
        let l: Line = serde_json::from_str(text).map_err(|e| Error::File {
            path: self.path.clone(),
            msg: format!("line {}: not a pair object {{prompt, chosen, rejected, category?, scores?}}: {e}", index + 1),
        })?;
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
            scores: l.scores,
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
