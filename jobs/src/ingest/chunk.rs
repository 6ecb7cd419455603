//! Splits a document into chunks of at most `max_tokens` tokens of the model's own tokenizer,
//! consecutive chunks sharing at most `overlap` tokens. Cuts fall on the strongest boundary
//! near the limit: a paragraph, else a sentence, else a word, and only inside a word when a
//! single word is longer than half a chunk.

use std::ops::Range;
use tokenizers::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    pub max_tokens: usize,
    pub overlap: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    /// Which of the document's tokens the chunk holds.
    pub tokens: Range<usize>,
}

/// How good a place the point before token `i` is to cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Boundary {
    InsideWord,
    Word,
    Sentence,
    Paragraph,
}

/// `tokenizer` must not truncate; special tokens are not counted (the model adds its two).
pub fn split(tokenizer: &Tokenizer, text: &str, chunking: Chunking) -> anyhow::Result<Vec<Chunk>> {
    split_in(tokenizer, text, chunking, SEGMENT_BYTES)
}

/// How much text is tokenized at once. The tokenizer holds about 35 bytes for each byte it
/// reads (its tokens, their offsets, the normalized text's alignments): a 64 MiB document read
/// whole took over 2 GiB. Read a segment at a time, ending at white space, which no token
/// crosses, the tokens are the same.
const SEGMENT_BYTES: usize = 64 << 10;

fn split_in(
    tokenizer: &Tokenizer,
    text: &str,
    chunking: Chunking,
    segment: usize,
) -> anyhow::Result<Vec<Chunk>> {
    let Chunking {
        max_tokens,
        overlap,
    } = chunking;
    anyhow::ensure!(max_tokens > 0, "max_tokens must be positive");
    anyhow::ensure!(
        overlap <= max_tokens / 2,
        "overlap must be at most max_tokens / 2"
    );
    let tokens = tokenize(tokenizer, text, segment)?;
    let n = tokens.len();
    let boundary = |i: usize| -> Boundary {
        let gap = text
            .get(tokens[i - 1].end as usize..tokens[i].start as usize)
            .unwrap_or("");
        if gap.matches('\n').count() >= 2 {
            Boundary::Paragraph
        } else if gap.contains('\n') || ends_sentence(&tokens, i, gap) {
            Boundary::Sentence
        } else if tokens[i].class == Class::WordPiece {
            Boundary::InsideWord
        } else {
            Boundary::Word
        }
    };
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let limit = (start + max_tokens).min(n);
        // The strongest boundary in the second half of the window; the latest of equals.
        let end = if limit == n {
            n
        } else {
            (start + max_tokens / 2 + 1..=limit)
                .max_by_key(|&p| (boundary(p), p))
                .filter(|&p| boundary(p) > Boundary::InsideWord)
                .unwrap_or(limit)
        };
        push_capped(
            &mut chunks,
            &text[tokens[start].start as usize..tokens[end - 1].end as usize],
            start..end,
            max_tokens,
        );
        if end == n {
            break;
        }
        // The next chunk starts at the strongest boundary within `overlap` tokens before the
        // cut, the earliest of equals; at the cut itself when there is no overlap.
        let earliest = end.saturating_sub(overlap).max(start + 1);
        start = (earliest..end)
            .max_by_key(|&p| (boundary(p), std::cmp::Reverse(p)))
            .filter(|&p| boundary(p) > Boundary::InsideWord)
            .unwrap_or(earliest);
    }
    Ok(chunks)
}

/// What splitting reads of a token: where it lies in the text, and what it is.
struct Token {
    start: u32,
    end: u32,
    class: Class,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A piece that continues a word (`##ing`).
    WordPiece,
    /// `.`, `!` or `?`.
    Stop,
    /// A closing quote or bracket.
    Closer,
    /// CJK sentence punctuation.
    WideStop,
    Other,
}

impl Class {
    fn of(token: &str) -> Self {
        match token {
            "." | "!" | "?" => Class::Stop,
            "\"" | "'" | ")" | "]" | "”" | "’" => Class::Closer,
            "。" | "！" | "？" => Class::WideStop,
            t if t.starts_with("##") => Class::WordPiece,
            _ => Class::Other,
        }
    }
}

/// The text's tokens, `segment` bytes of it (to white space) at a time.
fn tokenize(tokenizer: &Tokenizer, text: &str, segment: usize) -> anyhow::Result<Vec<Token>> {
    anyhow::ensure!(
        u32::try_from(text.len()).is_ok(),
        "a document of more than 4 GiB"
    );
    let mut tokens = Vec::new();
    let mut from = 0;
    while from < text.len() {
        let to = segment_end(text, from, segment);
        let encoding = tokenizer
            .encode(&text[from..to], false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let pieces = encoding.get_tokens().iter().zip(encoding.get_offsets());
        tokens.extend(pieces.map(|(token, &(start, end))| Token {
            start: (from + start) as u32,
            end: (from + end) as u32,
            class: Class::of(token),
        }));
        from = to;
    }
    Ok(tokens)
}

/// Where the segment from `from` ends: after the last white space within `segment` bytes, else
/// at a character boundary there (a word that long is cut), else the text's end.
fn segment_end(text: &str, from: usize, segment: usize) -> usize {
    let limit = from.saturating_add(segment);
    if limit >= text.len() {
        return text.len();
    }
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    match text[from..cut].rfind(char::is_whitespace) {
        Some(at) if at > 0 => {
            let space = text[from + at..].chars().next().map_or(1, char::len_utf8);
            from + at + space
        }
        _ if cut > from => cut,
        // A segment narrower than one character.
        _ => from + text[from..].chars().next().map_or(1, char::len_utf8),
    }
}

/// Most bytes of one chunk of `max_tokens` tokens. A token is a piece of a word, but a word the
/// vocabulary cannot read (over 100 characters) is one unknown token however long: a 64 MiB
/// "word" was one chunk, stored, embedded and returned by every search that found it.
fn byte_cap(max_tokens: usize) -> usize {
    (max_tokens * 32).max(1024)
}

/// Pushes `text` as one chunk, or, past [`byte_cap`], as pieces of at most that many bytes
/// (cut at characters); the first piece counts the tokens.
fn push_capped(chunks: &mut Vec<Chunk>, mut text: &str, tokens: Range<usize>, max_tokens: usize) {
    let cap = byte_cap(max_tokens);
    let mut counted = tokens.clone();
    while text.len() > cap {
        let mut cut = cap;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        chunks.push(Chunk {
            text: text[..cut].to_owned(),
            tokens: counted.clone(),
        });
        counted = tokens.end..tokens.end;
        text = &text[cut..];
    }
    chunks.push(Chunk {
        text: text.to_owned(),
        tokens: counted,
    });
}

/// Whether token `i` follows the end of a sentence: `.`, `!` or `?` (maybe then a quote or a
/// bracket) and a space, or CJK sentence punctuation.
fn ends_sentence(tokens: &[Token], i: usize, gap: &str) -> bool {
    let class = |at: usize| tokens[at].class;
    let western = class(i - 1) == Class::Stop
        || (i >= 2 && class(i - 1) == Class::Closer && class(i - 2) == Class::Stop);
    (western && !gap.is_empty()) || class(i - 1) == Class::WideStop
}

#[cfg(test)]
mod tests {
    use super::*;
    use embed::testing::installed_model;

    fn count(tokenizer: &Tokenizer, text: &str) -> usize {
        tokenizer.encode(text, false).unwrap().len()
    }

    /// Sentences of 3 to 11 words (at most 17 tokens), grouped into paragraphs, the same every run.
    fn prose() -> String {
        let words = [
            "the",
            "queue",
            "worker",
            "embeds",
            "every",
            "chunk",
            "before",
            "storing",
            "vectors",
            "alongside",
            "metadata",
            "and",
            "retries",
            "failed",
            "attempts",
            "with",
            "backoff",
        ];
        let mut text = String::new();
        for paragraph in 0..6 {
            for sentence in 0..5 {
                let length = 3 + (paragraph * 7 + sentence * 3) % 9;
                let body: Vec<&str> = (0..length)
                    .map(|w| words[(paragraph + sentence * 5 + w * 3) % words.len()])
                    .collect();
                text.push_str(&format!(
                    "Sentence {paragraph}-{sentence}: {}. ",
                    body.join(" ")
                ));
            }
            text.push_str("\n\n");
        }
        text
    }

    /// Tokenized a segment at a time (cut at white space), a document splits as it does
    /// read whole.
    #[test]
    fn segments_split_as_the_whole_text_does() {
        let tokenizer = installed_model().counter().clone();
        let text = format!(
            "{}“Quoted.” Then 東京。 More\r\n{}",
            prose(),
            prose().repeat(3)
        );
        for (max_tokens, overlap) in [(40, 8), (64, 0), (254, 32)] {
            let chunking = Chunking {
                max_tokens,
                overlap,
            };
            let whole = split_in(&tokenizer, &text, chunking, usize::MAX).unwrap();
            // Wider than any word: a longer word is read in pieces.
            for segment in [64, 200, 4096] {
                let segmented = split_in(&tokenizer, &text, chunking, segment).unwrap();
                assert_eq!(segmented, whole, "segments of {segment} bytes");
            }
        }
    }

    /// The tokenizer holds about 35 bytes for each byte it reads: a 64 MiB document read
    /// whole took over 2 GiB. Split a segment at a time, a 4 MiB document holds a few times
    /// itself (its chunks, which overlap, and a compact record a token).
    #[test]
    fn a_long_document_is_tokenized_a_segment_at_a_time() {
        let tokenizer = installed_model().counter().clone();
        let paragraph = prose();
        let text = paragraph.repeat((4 << 20) / paragraph.len());
        let chunking = Chunking {
            max_tokens: 254,
            overlap: 32,
        };
        let (chunks, held) = crate::allocated::peak(|| split(&tokenizer, &text, chunking).unwrap());
        assert!(chunks.len() > 1000);
        let ratio = held as f64 / text.len() as f64;
        assert!(ratio < 6.0, "held {held} bytes, {ratio:.1}× the text");
    }

    #[test]
    fn chunks_respect_the_limit_and_the_overlap_and_cut_at_sentences() {
        let tokenizer = installed_model().counter().clone();
        let text = prose();
        let total = count(&tokenizer, &text);
        for (max_tokens, overlap) in [(40, 8), (64, 0), (25, 12), (254, 32), (12, 3)] {
            let chunks = split(
                &tokenizer,
                &text,
                Chunking {
                    max_tokens,
                    overlap,
                },
            )
            .unwrap();
            assert_eq!(chunks.first().unwrap().tokens.start, 0);
            assert_eq!(chunks.last().unwrap().tokens.end, total);
            for chunk in &chunks {
                assert!(chunk.tokens.len() <= max_tokens, "{chunk:?}");
                // The chunk's own text tokenizes to exactly the tokens it claims.
                assert_eq!(
                    count(&tokenizer, &chunk.text),
                    chunk.tokens.len(),
                    "{chunk:?}"
                );
            }
            for pair in chunks.windows(2) {
                let (previous, next) = (&pair[0].tokens, &pair[1].tokens);
                assert!(next.start > previous.start);
                let shared = previous.end.saturating_sub(next.start);
                assert!(
                    shared <= overlap,
                    "{shared} tokens shared, overlap {overlap}"
                );
                if overlap > 0 {
                    assert!(shared > 0, "no overlap between {previous:?} and {next:?}");
                } else {
                    assert_eq!(next.start, previous.end);
                }
                if max_tokens / 2 >= 17 {
                    // Every sentence is shorter than half a chunk: cuts fall after a full stop.
                    assert!(pair[0].text.ends_with('.'), "{:?}", pair[0].text);
                }
            }
            assert!(
                chunks.len() > total / max_tokens,
                "{max_tokens}: {}",
                chunks.len()
            );
        }
    }

    #[test]
    fn a_paragraph_break_wins_over_a_later_sentence_end() {
        let tokenizer = installed_model().counter().clone();
        let text = "One two three four five six seven eight nine ten eleven twelve.\n\n\
                    Alpha beta gamma. Delta epsilon. Zeta eta theta iota kappa lambda mu nu xi.";
        let chunking = Chunking {
            max_tokens: 20,
            overlap: 0,
        };
        let chunks = split(&tokenizer, text, chunking).unwrap();
        assert!(chunks[0].text.ends_with("twelve."), "{chunks:?}");
        assert!(chunks[1].text.starts_with("Alpha"), "{chunks:?}");
    }

    #[test]
    fn an_endless_word_is_cut_inside_and_still_fits() {
        let tokenizer = installed_model().counter().clone();
        // WordPiece reads words of up to 100 characters (longer ones are one unknown token).
        let text = "supercalifragilistic".repeat(4) + " done";
        assert!(count(&tokenizer, &text) > 15);
        let chunking = Chunking {
            max_tokens: 10,
            overlap: 2,
        };
        let chunks = split(&tokenizer, &text, chunking).unwrap();
        assert!(chunks.len() > 2, "{chunks:?}");
        assert!(chunks.iter().all(|c| c.tokens.len() <= 10), "{chunks:?}");
        assert!(chunks.last().unwrap().text.ends_with("done"));
    }

    /// A "word" of a megabyte is one unknown token: it was one chunk of a megabyte.
    #[test]
    fn a_chunk_holds_a_bounded_number_of_bytes_however_long_its_words() {
        let tokenizer = installed_model().counter().clone();
        let text = format!("start {} é{} end", "a".repeat(1 << 20), "b".repeat(5000));
        let chunking = Chunking {
            max_tokens: 16,
            overlap: 0,
        };
        let chunks = split(&tokenizer, &text, chunking).unwrap();
        assert!(
            chunks.iter().all(|c| c.text.len() <= 1024),
            "{}",
            chunks.len()
        );
        assert!(chunks.len() > 1024, "{}", chunks.len());
        // Every byte kept, in order; the tokens counted once (a word longer than a segment is
        // read in pieces, each one unknown token, as the whole word was).
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined.replace(' ', ""), text.replace(' ', ""));
        let counted: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        assert_eq!(counted, chunks.last().unwrap().tokens.end);
    }

    #[test]
    fn empty_text_has_no_chunks_and_bad_settings_are_refused() {
        let tokenizer = installed_model().counter().clone();
        let chunking = Chunking {
            max_tokens: 10,
            overlap: 2,
        };
        assert!(split(&tokenizer, "  \n ", chunking).unwrap().is_empty());
        let too_much = Chunking {
            max_tokens: 10,
            overlap: 6,
        };
        assert!(split(&tokenizer, "text", too_much).is_err());
    }
}
