//! Incremental detokenization for streaming: each step emits only complete UTF-8 characters, holds back
//! text that could be the start of a stop string, and cuts the output before a matched stop string.

/// What a new token adds to the visible output.
#[derive(Debug, PartialEq, Eq)]
pub struct TextDelta {
    pub text: String,
    /// The stop string that matched; the output ends before it.
    pub stop: Option<String>,
}

#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    /// Bytes of the full decoded output already emitted.
    emitted: usize,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, emitted: 0 }
    }

    /// `full` is the whole output decoded so far; `finished` says no more tokens will follow (flush).
    pub fn advance(&mut self, full: &str, finished: bool) -> TextDelta {
        // A trailing U+FFFD is a character still split across tokens: wait for the rest.
        let mut end = full.len();
        if !finished && full.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let search_from = self.emitted.saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(full, search_from);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| full[search_from..].find(s.as_str()).map(|p| (search_from + p, s)))
            .min_by_key(|(p, _)| *p);
        if let Some((pos, stop)) = first_match {
            let text = full.get(self.emitted.min(pos)..pos).unwrap_or_default().to_string();
            self.emitted = pos.max(self.emitted);
            return TextDelta { text, stop: Some(stop.clone()) };
        }
        if !finished {
            // Hold back the longest suffix that is a prefix of a stop string.
            let held = self
                .stops
                .iter()
                .flat_map(|s| (1..s.len()).rev().filter(move |&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
                .filter(|prefix| full[..end].ends_with(prefix))
                .map(|p| p.len())
                .max()
                .unwrap_or(0);
            end -= held;
        }
        let end = end.max(self.emitted);
        let text = full.get(self.emitted..end).unwrap_or_default().to_string();
        self.emitted = end;
        TextDelta { text, stop: None }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_tokens_are_held_back_then_cut() {
        let mut s = StopScanner::new(vec!["\n\nUser:".into()]);
        assert_eq!(s.advance("Hello", false).text, "Hello");
        // "\n" could start the stop string: held back.
        assert_eq!(s.advance("Hello world\n", false).text, " world");
        assert_eq!(s.advance("Hello world\n\nUs", false).text, "");
        let d = s.advance("Hello world\n\nUser: hi", false);
        assert_eq!(d, TextDelta { text: String::new(), stop: Some("\n\nUser:".into()) });
    }

    #[test]
    fn held_back_text_is_released_when_it_does_not_become_a_stop_and_on_finish() {
        let mut s = StopScanner::new(vec!["END".into()]);
        assert_eq!(s.advance("a E", false).text, "a ");
        assert_eq!(s.advance("a Ex", false).text, "Ex");
        assert_eq!(s.advance("a ExEN", false).text, "");
        assert_eq!(s.advance("a ExEN", true).text, "EN");
    }

    #[test]
    fn incomplete_characters_wait_for_their_last_byte() {
        let mut s = StopScanner::new(vec![]);
        assert_eq!(s.advance("caf\u{FFFD}", false).text, "caf");
        assert_eq!(s.advance("café", false).text, "é");
    }
}
