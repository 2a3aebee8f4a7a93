//! How often several reward models agree with a manifest's preference labels (`vipo data agree`),
//! and the manifest of the pairs on which they do: the ViPO paper's "pairs on which all reward
//! models agree" (20.79% of Pick-a-Pic).
//!
//! Only pairs whose `scores` name at least two scorers are judged. Each scorer votes +1 when
//! `chosen - rejected > tie_tol` (it agrees with the label), -1 when `< -tie_tol` (it prefers the
//! rejected image) and 0 otherwise (a tie: it abstains). A pair is **agreed** when no scorer votes
//! -1 and at least one votes +1, **strict** when every scorer votes +1, **vetoed** when some
//! scorer votes -1 and **all tied** when every scorer votes 0 (agreed + vetoed + all tied = pairs
//! with several scores). Pairs with fewer scores (none, the single form, or one name) are counted
//! but never judged, nor written by [`filter_agreed`]. Images are not opened: a pair whose files
//! are missing is judged by its scores, and the trainer skips it as it would in the original.
//!
//! `--json` prints [`Agreement`] as one object; its field names are stable:
//! `source`, `tie_tol`, `pairs` (non-blank lines), `several_scores`, `fewer_scores`, `agreed`,
//! `strict`, `vetoed`, `all_tied`, `agreement_rate` and `strict_rate` (fractions of
//! `several_scores`, `null` when it is 0), `per_scorer` (`{NAME: {pairs, agree, disagree, tie}}`
//! over judged pairs that NAME scored), `per_category` (`{CATEGORY: {pairs, several_scores,
//! agreed, strict, agreement_rate}}`, `(none)` for pairs without one; `{}` when no pair has a
//! category) and `out` (the written manifest, or `null`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::jsonl::{parse_line, ManifestLine};
use super::{PairScores, Scores, NO_CATEGORY};
use crate::error::{Error, Result};

/// `--tie-tol`'s default: score differences within it are ties.
pub const DEFAULT_TIE_TOL: f64 = 1e-6;

/// One scorer's vote on a pair: +1 prefers `chosen`, -1 prefers `rejected`, 0 a tie.
pub fn vote(s: &Scores, tie_tol: f64) -> i8 {
    let d = s.chosen - s.rejected;
    if d > tie_tol {
        1
    } else if d < -tie_tol {
        -1
    } else {
        0
    }
}

/// The votes of a pair's scorers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Votes {
    pub agree: usize,
    pub disagree: usize,
    pub tie: usize,
}

impl Votes {
    pub fn of(named: &BTreeMap<String, Scores>, tie_tol: f64) -> Votes {
        let mut v = Votes::default();
        for s in named.values() {
            match vote(s, tie_tol) {
                1 => v.agree += 1,
                -1 => v.disagree += 1,
                _ => v.tie += 1,
            }
        }
        v
    }

    /// No scorer prefers `rejected` and at least one prefers `chosen`.
    pub fn agreed(&self) -> bool {
        self.disagree == 0 && self.agree > 0
    }

    /// Every scorer prefers `chosen`.
    pub fn strict(&self) -> bool {
        self.disagree == 0 && self.tie == 0 && self.agree > 0
    }
}

/// A pair's named scores when there are at least two: the pairs agreement judges.
pub fn several(scores: Option<&PairScores>) -> Option<&BTreeMap<String, Scores>> {
    scores.and_then(PairScores::named).filter(|m| m.len() >= 2)
}

/// One scorer's votes over the judged pairs it scored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScorerCounts {
    pub pairs: u64,
    pub agree: u64,
    pub disagree: u64,
    pub tie: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CategoryAgreement {
    pub pairs: u64,
    pub several_scores: u64,
    pub agreed: u64,
    pub strict: u64,
    pub agreement_rate: Option<f64>,
}

/// What `vipo data agree` reports; see the module doc for the fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Agreement {
    pub source: PathBuf,
    pub tie_tol: f64,
    pub pairs: u64,
    pub several_scores: u64,
    pub fewer_scores: u64,
    pub agreed: u64,
    pub strict: u64,
    pub vetoed: u64,
    pub all_tied: u64,
    pub agreement_rate: Option<f64>,
    pub strict_rate: Option<f64>,
    pub per_scorer: BTreeMap<String, ScorerCounts>,
    pub per_category: BTreeMap<String, CategoryAgreement>,
    pub out: Option<PathBuf>,
}

fn rate(n: u64, of: u64) -> Option<f64> {
    (of > 0).then(|| n as f64 / of as f64)
}

fn percent(r: Option<f64>) -> String {
    r.map(|r| format!("{:.2}%", 100.0 * r)).unwrap_or_else(|| "n/a".into())
}

impl Agreement {
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let mut line = |s: String| {
            t.push_str(&s);
            t.push('\n');
        };
        line(format!("source: {}", self.source.display()));
        line(format!("tie tolerance: {}", self.tie_tol));
        line(format!("pairs: {}", self.pairs));
        line(format!(
            "pairs with several scores: {} ({} with fewer: counted, not judged, never written by --out)",
            self.several_scores, self.fewer_scores
        ));
        line(format!(
            "agreed: {} / {} ({}): no scorer prefers the rejected image, at least one the chosen",
            self.agreed,
            self.several_scores,
            percent(self.agreement_rate)
        ));
        line(format!(
            "strict: {} / {} ({}): every scorer prefers the chosen image",
            self.strict,
            self.several_scores,
            percent(self.strict_rate)
        ));
        line(format!("vetoed (a scorer prefers the rejected image): {}; all tied: {}", self.vetoed, self.all_tied));
        if !self.per_scorer.is_empty() {
            line("per scorer (agrees / disagrees / ties with the label, of the judged pairs it scored):".into());
            for (k, c) in &self.per_scorer {
                line(format!("  {k}: {} / {} / {} of {}", c.agree, c.disagree, c.tie, c.pairs));
            }
        }
        if !self.per_category.is_empty() {
            line("per category (agreed / pairs with several scores, of pairs):".into());
            for (k, c) in &self.per_category {
                line(format!(
                    "  {k}: {} / {} ({}) of {}",
                    c.agreed,
                    c.several_scores,
                    percent(c.agreement_rate),
                    c.pairs
                ));
            }
        }
        if let Some(out) = &self.out {
            line(format!("wrote {} agreed pairs to {}", self.agreed, out.display()));
        }
        t
    }
}

fn check_tol(tie_tol: f64) -> Result<()> {
    if tie_tol.is_finite() && tie_tol >= 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("--tie-tol must be a finite number >= 0, got {tie_tol}")))
    }
}

/// Reads every line of `path` and counts; `on_agreed` gets each agreed pair's line, in order.
fn scan(path: &Path, tie_tol: f64, mut on_agreed: impl FnMut(ManifestLine) -> Result<()>) -> Result<Agreement> {
    check_tol(tie_tol)?;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut a = Agreement { source: path.to_path_buf(), tie_tol, ..Agreement::default() };
    let mut any_category = false;
    for (i, text) in BufReader::new(f).lines().enumerate() {
        let lineno = i as u64 + 1;
        let text = text.map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("line {lineno}: {e}") })?;
        if text.trim().is_empty() {
            continue;
        }
        let l = parse_line(path, lineno, text.trim())?;
        a.pairs += 1;
        any_category |= l.category.is_some();
        let cat = a.per_category.entry(l.category.as_deref().unwrap_or(NO_CATEGORY).to_string()).or_default();
        cat.pairs += 1;
        let Some(named) = several(l.scores.as_ref()) else {
            a.fewer_scores += 1;
            continue;
        };
        let v = Votes::of(named, tie_tol);
        for (k, s) in named {
            let c = a.per_scorer.entry(k.clone()).or_default();
            c.pairs += 1;
            match vote(s, tie_tol) {
                1 => c.agree += 1,
                -1 => c.disagree += 1,
                _ => c.tie += 1,
            }
        }
        a.several_scores += 1;
        cat.several_scores += 1;
        if v.disagree > 0 {
            a.vetoed += 1;
        } else if v.agree == 0 {
            a.all_tied += 1;
        }
        if v.strict() {
            a.strict += 1;
            cat.strict += 1;
        }
        if v.agreed() {
            a.agreed += 1;
            cat.agreed += 1;
            on_agreed(l)?;
        }
    }
    if !any_category {
        a.per_category.clear();
    }
    for c in a.per_category.values_mut() {
        c.agreement_rate = rate(c.agreed, c.several_scores);
    }
    a.agreement_rate = rate(a.agreed, a.several_scores);
    a.strict_rate = rate(a.strict, a.several_scores);
    Ok(a)
}

/// Counts how often the named scorers of the manifest `path` agree with its labels.
pub fn agreement(path: &Path, tie_tol: f64) -> Result<Agreement> {
    scan(path, tie_tol, |_| Ok(()))
}

/// [`agreement`], and writes the agreed pairs to the manifest `out` (atomically; its folder is
/// created), every other field kept and image paths rewritten to resolve from `out`'s folder.
pub fn filter_agreed(path: &Path, out: &Path, tie_tol: f64) -> Result<Agreement> {
    let same_file = match (path.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_file {
        return Err(Error::File {
            path: out.to_path_buf(),
            msg: "--out is the manifest being read; write the agreed pairs to another file".into(),
        });
    }
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (from, to) = (dir_of(path), dir_of(out));
    std::fs::create_dir_all(&to).map_err(|e| Error::io(&to, e))?;
    let from = from.canonicalize().map_err(|e| Error::io(&from, e))?;
    let to = to.canonicalize().map_err(|e| Error::io(&to, e))?;
    let mut text = String::new();
    let mut a = scan(path, tie_tol, |mut l| {
        for key in ["chosen", "rejected"] {
            let old = if key == "chosen" { &l.chosen } else { &l.rejected };
            let new = rebase(old, &from, &to)?;
            l.raw.insert(key.to_string(), Value::String(new));
        }
        let json = serde_json::to_string(&l.raw).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        text.push_str(&json);
        text.push('\n');
        Ok(())
    })?;
    crate::train::config::write_atomic(out, text.as_bytes())?;
    a.out = Some(out.to_path_buf());
    Ok(a)
}

/// `p`, written in a manifest in the folder `from`, as a manifest in `to` must write it (both
/// folders canonical): unchanged when absolute or when the folders are the same, else relative
/// to `to` when the paths share a root, else absolute.
fn rebase(p: &str, from: &Path, to: &Path) -> Result<String> {
    if Path::new(p).is_absolute() || from == to {
        return Ok(p.to_string());
    }
    // The canonical file when it exists (symlinks resolved, like `to`); otherwise `..` removed
    // by hand from the canonical folder.
    let joined = from.join(p);
    let target = joined.canonicalize().unwrap_or_else(|_| {
        let mut t = PathBuf::new();
        for c in joined.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    t.pop();
                }
                c => t.push(c),
            }
        }
        t
    });
    let (tc, oc): (Vec<_>, Vec<_>) = (target.components().collect(), to.components().collect());
    let common = tc.iter().zip(&oc).take_while(|(a, b)| a == b).count();
    let out = if common == 0 {
        target.clone()
    } else {
        let mut r = PathBuf::new();
        for _ in common..oc.len() {
            r.push("..");
        }
        for c in &tc[common..] {
            r.push(c);
        }
        r
    };
    let s = out.to_str().ok_or_else(|| Error::File {
        path: target.clone(),
        msg: "image path is not UTF-8, so a JSON manifest cannot hold it".into(),
    })?;
    // Relative paths with forward slashes read on every platform (on Unix a backslash is a
    // file name character, so only Windows rewrites it).
    Ok(if cfg!(windows) && common > 0 { s.replace('\\', "/") } else { s.to_string() })
}
