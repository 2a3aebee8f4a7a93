//! CLIP's byte-level BPE tokenizer, the one in front of SD1.x/SD2.x text encoders, reading a
//! diffusers `tokenizer/` folder (`vocab.json`, `merges.txt`, and optionally
//! `tokenizer_config.json` / `special_tokens_map.json`).
//!
//! It reproduces OpenAI's reference algorithm (CLIP's `simple_tokenizer.py`, as open_clip and
//! transformers 4's slow `CLIPTokenizer` with ftfy run it), the text CLIP was trained on:
//! 1. a port of `ftfy.fix_text` (all but its rarest mojibake repairs, listed at `Cleaner::ftfy_lite`),
//! 2. `html.unescape` twice, with Python's exact rules,
//! 3. whitespace collapse + strip, lower-casing,
//! 4. pre-tokenisation `'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`,
//! 5. byte-level BPE with a `</w>` end-of-word suffix, by merge rank.
//!
//! Where the slow and the fast (tokenizers-backed) Python tokenizers disagree we follow the slow
//! one, see `tests/clip_tokenizer.rs` for the three cases and why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// Context length of SD1.x/SD2.x text encoders (77 positions, BOS and EOS included).
pub const CLIP_MAX_LENGTH: usize = 77;
pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// SD1.5 pads with EOS; SD2's folders say `"!"` (id 0) in `special_tokens_map.json`.
pub const SD15_PAD_TOKEN: &str = "<|endoftext|>";

// OpenAI's pattern without its leading `<\|startoftext\|>|<\|endoftext\|>` alternatives: a
// prompt that spells a special token is text, not a control token (open_clip, and the reference
// ids, behave so; see the test). No `(?i)`: the text is already lower-cased, and Python's
// IGNORECASE only differs on U+0345, handled in `pre_tokenize`.
const PRE_TOKENIZE: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// Words kept in the BPE cache before it is cleared (a prompt has a few dozen).
const CACHE_LIMIT: usize = 1 << 16;

/// Ids of one prompt laid out for the text encoder: BOS, tokens, EOS, then padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// `Some(n)`: the prompt needed `n` ids (BOS and EOS included) and was cut to `max_len`,
    /// keeping EOS last, as transformers' `truncation=True` does.
    pub truncated_from: Option<usize>,
}

impl TokenizedPrompt {
    /// The line a CLI prints when the prompt did not fit, `None` when it did.
    pub fn truncation_warning(&self) -> Option<String> {
        self.truncated_from
            .map(|n| format!("prompt too long: {n} tokens, the model takes {}; the rest is ignored", self.ids.len()))
    }
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id); a lower rank merges first.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte as a word-inner symbol and as the last symbol (with `</w>`).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    byte_decoder: HashMap<char, u8>,
    pat: Regex,
    cleaner: Cleaner,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers/transformers `tokenizer/` folder. `vocab.json` and `merges.txt` are
    /// required; bos/eos/pad and `model_max_length` come from `tokenizer_config.json`, overridden
    /// by `special_tokens_map.json` (as transformers does), and default to SD1.5's values.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut specials = Specials::sd15();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let cfg: serde_json::Value = read_json(&path)?;
            let Some(obj) = cfg.as_object() else {
                return Err(file_err(&path, "expected a JSON object"));
            };
            let slots =
                [("bos_token", &mut specials.bos), ("eos_token", &mut specials.eos), ("pad_token", &mut specials.pad)];
            for (key, slot) in slots {
                match obj.get(key) {
                    None | Some(serde_json::Value::Null) => {}
                    Some(v) => {
                        let content = token_content(v).ok_or_else(|| file_err(&path, format!("{key}: not a token")))?;
                        *slot = (content, Some(path.clone()));
                    }
                }
            }
            // transformers writes 1e30 for "no limit"; CLIP's position table is what limits.
            if let Some(n) = obj.get("model_max_length").and_then(|v| v.as_u64()) {
                if (2..=1 << 20).contains(&n) {
                    specials.max_length = n as usize;
                }
            }
        }
        Self::load(&dir.join("vocab.json"), &dir.join("merges.txt"), specials)
    }

    /// Loads `vocab.json` + `merges.txt` with SD1.5's special tokens and context length.
    pub fn from_files(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        Self::load(vocab.as_ref(), merges.as_ref(), Specials::sd15())
    }

    fn load(vocab_path: &Path, merges_path: &Path, specials: Specials) -> Result<Self> {
        let vocab: HashMap<String, u32> = read_json(vocab_path)?;
        let merges_text = std::fs::read_to_string(merges_path).map_err(|e| Error::io(merges_path, e))?;

        let byte_encoder = bytes_to_unicode();
        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (b, &c) in byte_encoder.iter().enumerate() {
            let (inner, end) = (c.to_string(), format!("{c}</w>"));
            for (tok, slot) in [(inner, &mut byte_ids[b]), (end, &mut byte_end_ids[b])] {
                *slot = *vocab.get(&tok).ok_or_else(|| {
                    file_err(
                        vocab_path,
                        format!("byte token {tok:?} (byte {b:#04x}) is missing; not a CLIP vocabulary"),
                    )
                })?;
            }
        }

        let mut merge_map = HashMap::new();
        let mut rank = 0u32;
        for (i, line) in merges_text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(file_err(merges_path, format!("line {}: expected two symbols, got {line:?}", i + 1)));
            };
            let id = |s: &str| {
                vocab.get(s).copied().ok_or_else(|| {
                    file_err(merges_path, format!("line {}: {s:?} is not in {}", i + 1, vocab_path.display()))
                })
            };
            // Python's dict(zip(merges, ranks)) keeps the last rank of a repeated pair.
            merge_map.insert((id(a)?, id(b)?), (rank, id(&format!("{a}{b}"))?));
            rank += 1;
        }
        if merge_map.is_empty() {
            return Err(file_err(merges_path, "no merges"));
        }

        // A special token named by a config file is reported against that file.
        let special = |(tok, source): &(String, Option<PathBuf>)| {
            vocab.get(tok.as_str()).copied().ok_or_else(|| match source {
                Some(cfg) => file_err(cfg, format!("special token {tok:?} is not in {}", vocab_path.display())),
                None => file_err(vocab_path, format!("special token {tok:?} is missing")),
            })
        };
        let (bos, eos, pad) = (special(&specials.bos)?, special(&specials.eos)?, special(&specials.pad)?);
        let decoder = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        let byte_decoder = byte_encoder.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let pattern_err = |e: regex::Error| Error::Invalid(format!("clip tokenizer pattern: {e}"));
        let pat = Regex::new(PRE_TOKENIZE).map_err(pattern_err)?;
        let cleaner = Cleaner {
            ansi: Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").map_err(pattern_err)?,
            badness: badness_regex().map_err(pattern_err)?,
        };
        Ok(Self {
            vocab,
            decoder,
            merges: merge_map,
            byte_ids,
            byte_end_ids,
            byte_decoder,
            pat,
            cleaner,
            bos,
            eos,
            pad,
            max_length: specials.max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    /// `model_max_length` of the folder (77 for SD1.x/SD2.x).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(String::as_str)
    }

    /// BOS, the prompt's tokens, EOS; neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        for word in self.pre_tokenize(text) {
            ids.extend(self.bpe(word.as_str()));
        }
        ids.push(self.eos);
        Ok(ids)
    }

    /// `encode` cut to `max_len` ids (EOS kept last) and padded with the pad token, like
    /// transformers' `padding="max_length", truncation=True`.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        Ok(self.tokenize_padded(text, max_len)?.ids)
    }

    /// `encode_padded` that also reports a truncation.
    pub fn tokenize_padded(&self, text: &str, max_len: usize) -> Result<TokenizedPrompt> {
        if max_len < 2 {
            return Err(Error::Invalid(format!(
                "clip tokenizer: max_len {max_len} leaves no room for BOS and EOS (need >= 2)"
            )));
        }
        let mut ids = self.encode(text)?;
        let n = ids.len();
        let truncated_from = (n > max_len).then_some(n);
        if n > max_len {
            ids.truncate(max_len);
            ids[max_len - 1] = self.eos;
        }
        ids.resize(max_len, self.pad);
        Ok(TokenizedPrompt { ids, truncated_from })
    }

    /// `tokenize_padded` at the folder's `model_max_length`, what a pipeline feeds its encoder.
    pub fn encode_prompt(&self, text: &str) -> Result<TokenizedPrompt> {
        self.tokenize_padded(text, self.max_length)
    }

    /// The vocabulary strings of the prompt's tokens (no BOS/EOS), e.g. `["a</w>", "cat</w>"]`.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>> {
        let ids = self.encode(text)?;
        Ok(ids[1..ids.len() - 1].iter().filter_map(|id| self.id_to_token(*id).map(str::to_string)).collect())
    }

    /// Text of `ids` (e.g. the part a truncation cut off), skipping BOS/EOS; words end at `</w>`.
    /// Meant for unpadded ids: a pad token other than EOS (SD2's `!`) decodes as text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let text: String = ids
            .iter()
            .filter(|&&id| id != self.bos && id != self.eos)
            .filter_map(|id| self.decoder.get(id))
            .map(|t| t.as_str())
            .collect();
        let bytes: Vec<u8> = text
            .replace("</w>", " ")
            .chars()
            .map(|c| if c == ' ' { b' ' } else { self.byte_decoder.get(&c).copied().unwrap_or(b'?') })
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// The cleaned, lower-cased text that pre-tokenisation splits (steps 1-3 of the module doc).
    pub fn normalize(&self, text: &str) -> String {
        let fixed = self.cleaner.ftfy_lite(text);
        let unescaped = py_html_unescape(&py_html_unescape(&fixed));
        // Python's str.split() also splits on U+001C..U+001F (ftfy removed them already).
        let collapsed = unescaped
            .split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        collapsed.to_lowercase()
    }

    fn pre_tokenize(&self, text: &str) -> Vec<String> {
        // Under the reference's IGNORECASE, U+0345 (which case-folds to a letter but is Mn)
        // matches no alternative and is skipped: same as a space here.
        let text = self.normalize(text).replace('\u{345}', " ");
        self.pat.find_iter(&text).map(|m| m.as_str().to_string()).collect()
    }

    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                return ids.clone();
            }
        }
        let ids = self.bpe_uncached(word.as_bytes());
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), ids.clone());
        }
        ids
    }

    /// Merges the pair of lowest rank everywhere (left to right) until no ranked pair is left.
    fn bpe_uncached(&self, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, inner)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<u32> = inner.iter().map(|&b| self.byte_ids[b as usize]).collect();
        word.push(self.byte_end_ids[last as usize]);
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&(rank, merged)| (rank, w[0], w[1], merged)))
                .min_by_key(|m| m.0);
            let Some((_, a, b, merged)) = best else { break };
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            word = out;
        }
        word
    }
}

/// Special tokens (content, the config file that named it) and the context length.
struct Specials {
    bos: (String, Option<PathBuf>),
    eos: (String, Option<PathBuf>),
    pad: (String, Option<PathBuf>),
    max_length: usize,
}

impl Specials {
    fn sd15() -> Self {
        Self {
            bos: (BOS_TOKEN.into(), None),
            eos: (EOS_TOKEN.into(), None),
            pad: (SD15_PAD_TOKEN.into(), None),
            max_length: CLIP_MAX_LENGTH,
        }
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("invalid JSON: {e}")))
}

/// A special token in a tokenizer config: `"<|endoftext|>"` or `{"content": "<|endoftext|>", ...}`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// GPT-2/CLIP's reversible byte -> printable char table: printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100.. in byte order.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

// ---------------------------------------------------------------------------------------------
// ftfy 6.3's `fix_text`.

/// Compiled patterns of the ftfy port.
struct Cleaner {
    ansi: Regex,
    badness: Regex,
}

impl Cleaner {
    /// `ftfy.fix_text` with its default config, per line and repeated until nothing changes, as
    /// ftfy does: HTML unescaping of `;`-terminated entities (unless the text has `<`), mojibake
    /// repair when ftfy's badness heuristic fires and the whole line re-encodes as Latin-1 or
    /// Windows-1252 into valid UTF-8, C1 controls as Windows-1252, Latin ligatures, full/half-width
    /// forms, curly quotes, ANSI escapes, control characters, NFC.
    ///
    /// Not ported (rare in prompts): mojibake mixed with correct non-ASCII text on one line
    /// (`decode_inconsistent_utf8`), the other single-byte code pages (1250/1251/1253/1254/1257,
    /// ISO-8859-2, MacRoman, CP437), `restore_byte_a0`, `replace_lossy_sequences`, CESU-8.
    fn ftfy_lite(&self, text: &str) -> String {
        let mut unescape = true;
        let mut out = String::with_capacity(text.len());
        for segment in text.split_inclusive('\n') {
            // ftfy switches this off for the segment with '<' and every segment after it.
            if segment.contains('<') {
                unescape = false;
            }
            let mut t = segment.to_string();
            for _ in 0..16 {
                let orig = t.clone();
                if unescape {
                    t = ftfy_unescape_html(&t);
                }
                t = self.fix_encoding(t);
                t = t
                    .chars()
                    .map(|c| match c as u32 {
                        0x80..=0x9f => cp1252_decode(c as u8),
                        _ => c,
                    })
                    .collect();
                t = fix_ligatures_and_width(&t);
                t = t
                    .chars()
                    .map(|c| match c {
                        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
                        '\u{201c}'..='\u{201f}' => '"',
                        c => c,
                    })
                    .collect();
                if t.contains('\x1b') {
                    t = self.ansi.replace_all(&t, "").into_owned();
                }
                t.retain(|c| !is_ftfy_control(c));
                t = t.nfc().collect();
                if t == orig {
                    break;
                }
            }
            out.push_str(&t);
        }
        out
    }

    /// Text that was UTF-8 but got decoded as Latin-1 or Windows-1252 ("cafÃ©" -> "café"), whole
    /// line at a time, repeated for doubly broken text.
    fn fix_encoding(&self, mut t: String) -> String {
        for _ in 0..8 {
            if t.is_ascii() || !self.badness.is_match(&t) {
                break;
            }
            let latin1: Option<Vec<u8>> = t.chars().map(|c| u8::try_from(c as u32).ok()).collect();
            let sloppy: Option<Vec<u8>> = t.chars().map(sloppy_cp1252_encode).collect();
            match [latin1, sloppy].into_iter().flatten().find_map(|b| String::from_utf8(b).ok()) {
                Some(f) if f != t => t = f,
                _ => break,
            }
        }
        t
    }
}

// ftfy's MOJIBAKE_CATEGORIES: the characters UTF-8 mojibake is made of, by role.
const COMMON: &str = "\u{a0}\u{ad}·´–—―…’";
const C1: &str = "\u{80}-\u{9f}";
const BAD: &str = "¦¤¨¬¯¸ƒˆˇ˘˛˜†‡‰⌐◊\u{fffd}ªº";
const LAW: &str = "¶§";
const CURRENCY: &str = "¢£¥₧€";
const START_PUNCTUATION: &str = "¡«¿©΄΅‘‚“„•‹\u{f8ff}";
const END_PUNCTUATION: &str = "®»˝”›™";
const NUMERIC: &str = "²³¹±¼½¾×µ÷⁄∂∆∏∑√∞∩∫≈≠≡≤≥№";
const KAOMOJI: &str = "Ò-ÖÙ-Üò-öø-üŐŌŪŲ°";
const UPPER_ACCENTED: &str = "À-ÑØÜÝĂĀĄĆČĎĐĘĚĒĖĞĢİĪĶĹĽŁĻŃŇŅŒŘŚŞŠŢŤŮŰŸŹŻŽҐ";
const LOWER_ACCENTED: &str = "ßà-ñăąāćčďđęěēėğģįīķĺľłļœŕśşšťüźżžґﬁﬂ";
const UPPER_COMMON: &str = "ÞΑ-ΩΆΈΉΊΌΎΏΪΫЁ-Я";
const LOWER_COMMON: &str = "α-ωάέήίΰа-џ";
const BOX: &str = "│┌┐┘├┤┬┼═-╬▀▄█▌▐░▒▓";

/// ftfy 6.3's BADNESS_RE (`is_bad`), alternative by alternative; Python's `\w` is `[\p{L}\p{N}_]`.
fn badness_regex() -> std::result::Result<Regex, regex::Error> {
    const ALTERNATIVES: [&str; 37] = [
        "[{c1}]",
        "[{bad}{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}][{bad}]",
        "[a-zA-Z][{lower_common}{upper_common}][{bad}]",
        "[{bad}][{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}]",
        "[{lower_accented}{lower_common}{box}{end_punctuation}{currency}{numeric}][{upper_accented}]",
        "[{box}{end_punctuation}{currency}{numeric}][{lower_accented}]",
        "[{lower_accented}{box}{end_punctuation}][{currency}]",
        "\\s[{upper_accented}][{currency}]",
        "[{upper_accented}{box}][{numeric}{law}]",
        "[{lower_accented}{upper_accented}{box}{currency}{end_punctuation}][{start_punctuation}][{numeric}]",
        "[{lower_accented}{upper_accented}{currency}{numeric}{box}{law}][{end_punctuation}][{start_punctuation}]",
        "[{currency}{numeric}{box}][{start_punctuation}]",
        "[a-z][{upper_accented}][{start_punctuation}{currency}]",
        "[{box}][{kaomoji}]",
        "[{lower_accented}{upper_accented}{currency}{numeric}{start_punctuation}{end_punctuation}{law}][{box}]",
        "[{box}][{end_punctuation}]",
        "[{lower_accented}{upper_accented}][{start_punctuation}{end_punctuation}][\\p{L}\\p{N}_]",
        "[Œœ][^A-Za-z]",
        "[{upper_accented}]°",
        "[ÂÃÎÐ][€œŠš¢£Ÿž\u{a0}\u{ad}®©°·»{start_punctuation}{end_punctuation}–—´]",
        "×[²³]",
        "[ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»][ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»]",
        "à[²µ¹¼½¾]",
        "√[±∂†≠®™´≤≥¥µø]",
        "≈[°¢]",
        "‚Ä[ìîïòôúùû†°¢π]",
        "‚[âó][àä°ê]",
        "вЂ",
        "[ВГРС][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°µ][ВГРС]",
        "ГўВЂВ.[A-Za-z ]",
        "Ã[\u{a0}¡]",
        "[a-z]\\s?[ÃÂ][ ]",
        "^[ÃÂ][ ]",
        "[a-z.,?!{end_punctuation}]Â[ {start_punctuation}{end_punctuation}]",
        "β€[™\u{a0}Ά\u{ad}®°]",
        "[ΒΓΞΟ][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°][ΒΓΞΟ]",
        "ā€",
    ];
    let categories = [
        ("{common}", COMMON),
        ("{c1}", C1),
        ("{bad}", BAD),
        ("{law}", LAW),
        ("{currency}", CURRENCY),
        ("{start_punctuation}", START_PUNCTUATION),
        ("{end_punctuation}", END_PUNCTUATION),
        ("{numeric}", NUMERIC),
        ("{kaomoji}", KAOMOJI),
        ("{upper_accented}", UPPER_ACCENTED),
        ("{lower_accented}", LOWER_ACCENTED),
        ("{upper_common}", UPPER_COMMON),
        ("{lower_common}", LOWER_COMMON),
        ("{box}", BOX),
    ];
    let pattern = ALTERNATIVES
        .iter()
        .map(|alt| categories.iter().fold(alt.to_string(), |a, (name, chars)| a.replace(name, chars)))
        .collect::<Vec<_>>()
        .join("|");
    Regex::new(&pattern)
}

/// ftfy's CONTROL_CHARS: C0 controls but \t \n \f \r, DEL, deprecated Arabic format controls,
/// BOM, interlinear annotation and object replacement characters.
fn is_ftfy_control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

fn fix_ligatures_and_width(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        let lig = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            '\u{3000}' => " ",
            _ => "",
        };
        if !lig.is_empty() {
            out.push_str(lig);
        } else if ('\u{ff01}'..='\u{ffef}').contains(&c) {
            // Full/half-width forms -> their NFKC form (ftfy's WIDTH_MAP).
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    out
}

/// Windows-1252 bytes 0x80..0x9F; the five undefined ones stay C1 controls ("sloppy" 1252).
const CP1252_HIGH: [char; 32] = [
    '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘', '’',
    '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
];

fn cp1252_decode(b: u8) -> char {
    match b {
        0x80..=0x9f => CP1252_HIGH[(b - 0x80) as usize],
        _ => b as char,
    }
}

/// ftfy's "sloppy-windows-1252" encoder: Windows-1252 plus its undefined bytes, and U+FFFD as 0x1A.
fn sloppy_cp1252_encode(c: char) -> Option<u8> {
    match c as u32 {
        0x1a => None,
        0xfffd => Some(0x1a),
        0x00..=0x7f | 0xa0..=0xff => Some(c as u8),
        _ => CP1252_HIGH.iter().position(|&h| h == c).map(|i| 0x80 + i as u8),
    }
}

/// ftfy's `unescape_html`: only `&name;` / `&#num;` forms with the semicolon, plus upper-cased
/// names of lower-case entities (`&EACUTE;` -> `É`) that HTML itself does not define.
fn ftfy_unescape_html(t: &str) -> String {
    if !t.contains('&') {
        return t.to_string();
    }
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        // &#?[0-9A-Za-z]{1,24};
        let after = &rest[1..];
        let hash = after.starts_with('#');
        let body = if hash { &after[1..] } else { after };
        let n = body.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if (1..=24).contains(&n) && body.as_bytes().get(n) == Some(&b';') {
            let len = 1 + usize::from(hash) + n + 1;
            let entity = &rest[..len];
            let name = &body[..n];
            let value = if hash {
                let u = py_html_unescape(entity);
                (!u.contains(';')).then_some(u)
            } else {
                named_entity(name).map(str::to_string).or_else(|| upper_entity(name))
            };
            out.push_str(value.as_deref().unwrap_or(entity));
            rest = &rest[len..];
        } else {
            out.push('&');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `&NAME;` where NAME is the upper-case form of an all-lower-case HTML5 entity name and is not
/// itself decoded by `html.unescape`: the entity's value, upper-cased.
fn upper_entity(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if lower == name || lower.to_ascii_uppercase() != name {
        return None;
    }
    let value = named_entity(&lower)?;
    let entity = format!("&{name};");
    (py_html_unescape(&entity) == entity).then(|| value.to_uppercase())
}

// ---------------------------------------------------------------------------------------------
// Python's html.unescape.

/// The WHATWG entity whose name (without `;`) is `name`.
fn named_entity(name: &str) -> Option<&'static str> {
    html_escape::NAMED_ENTITIES
        .binary_search_by(|(n, _)| (*n).cmp(name.as_bytes()))
        .ok()
        .map(|i| html_escape::NAMED_ENTITIES[i].1)
}

/// The 106 entities HTML5 also decodes without a semicolon (`&amp`, `&copy2024`), sorted.
const LEGACY_ENTITIES: [&str; 106] = [
    "AElig", "AMP", "Aacute", "Acirc", "Agrave", "Aring", "Atilde", "Auml", "COPY", "Ccedil", "ETH", "Eacute", "Ecirc",
    "Egrave", "Euml", "GT", "Iacute", "Icirc", "Igrave", "Iuml", "LT", "Ntilde", "Oacute", "Ocirc", "Ograve", "Oslash",
    "Otilde", "Ouml", "QUOT", "REG", "THORN", "Uacute", "Ucirc", "Ugrave", "Uuml", "Yacute", "aacute", "acirc",
    "acute", "aelig", "agrave", "amp", "aring", "atilde", "auml", "brvbar", "ccedil", "cedil", "cent", "copy",
    "curren", "deg", "divide", "eacute", "ecirc", "egrave", "eth", "euml", "frac12", "frac14", "frac34", "gt",
    "iacute", "icirc", "iexcl", "igrave", "iquest", "iuml", "laquo", "lt", "macr", "micro", "middot", "nbsp", "not",
    "ntilde", "oacute", "ocirc", "ograve", "ordf", "ordm", "oslash", "otilde", "ouml", "para", "plusmn", "pound",
    "quot", "raquo", "reg", "sect", "shy", "sup1", "sup2", "sup3", "szlig", "thorn", "times", "uacute", "ucirc",
    "ugrave", "uml", "uuml", "yacute", "yen", "yuml",
];

fn legacy_entity(name: &str) -> Option<&'static str> {
    LEGACY_ENTITIES.binary_search(&name).ok().and_then(|_| named_entity(name))
}

/// `html.unescape` of CPython 3.11: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`
/// with its replacement rules (legacy names without `;`, longest legacy prefix, Windows-1252
/// for &#128;..&#159;, U+FFFD for surrogates and > U+10FFFF, nothing for noncharacters).
fn py_html_unescape(t: &str) -> String {
    if !t.contains('&') {
        return t.to_string();
    }
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos + 1..];
        if let Some(num) = rest.strip_prefix('#') {
            let (hex, digits) = match num.strip_prefix(['x', 'X']) {
                Some(h) if !num.starts_with(|c: char| c.is_ascii_digit()) => (true, h),
                _ => (false, num),
            };
            let n = digits.bytes().take_while(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() }).count();
            if n == 0 {
                out.push('&');
                continue;
            }
            let radix = if hex { 16 } else { 10 };
            // Saturate: anything past U+10FFFF decodes the same (U+FFFD).
            let value = digits[..n]
                .chars()
                .filter_map(|c| c.to_digit(radix))
                .fold(0u64, |acc, d| (acc * radix as u64 + d as u64).min(0x11_0000));
            out.push_str(&numeric_charref(value));
            let consumed = 1 + usize::from(hex) + n;
            rest = &rest[consumed..];
            rest = rest.strip_prefix(';').unwrap_or(rest);
        } else {
            let end = rest
                .char_indices()
                .take_while(|&(_, c)| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
                .take(32)
                .last()
                .map(|(i, c)| i + c.len_utf8())
                .unwrap_or(0);
            if end == 0 {
                out.push('&');
                continue;
            }
            let name = &rest[..end];
            let semi = rest[end..].starts_with(';');
            let s_len = end + usize::from(semi);
            let hit = if semi { named_entity(name) } else { legacy_entity(name) };
            if let Some(v) = hit {
                out.push_str(v);
            } else {
                // Longest legacy prefix of at least 2 characters of the match (`;` included).
                let s = &rest[..s_len];
                let mut cuts: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
                cuts.reverse();
                match cuts.into_iter().find_map(|x| legacy_entity(&s[..x]).map(|v| (x, v))) {
                    Some((x, v)) => {
                        out.push_str(v);
                        out.push_str(&s[x..]);
                    }
                    None => {
                        out.push('&');
                        out.push_str(s);
                    }
                }
            }
            rest = &rest[s_len..];
        }
    }
    out.push_str(rest);
    out
}

fn numeric_charref(n: u64) -> String {
    match n {
        0 => "\u{fffd}".into(),
        0x0d => "\r".into(),
        0x80..=0x9f => cp1252_decode(n as u8).to_string(),
        0xd800..=0xdfff | 0x11_0000.. => "\u{fffd}".into(),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        _ if n & 0xfffe == 0xfffe => String::new(),
        _ => char::from_u32(n as u32).map(String::from).unwrap_or_default(),
    }
}
