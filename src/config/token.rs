//! The admin endpoint's bearer token.

use std::fmt;

use subtle::ConstantTimeEq;

/// A bearer token: non-empty visible ASCII, since it travels in an HTTP header.
///
/// `Debug` does not show it, so a logged or printed configuration never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(String);

impl Token {
    /// Returns the token if `value` can be sent in an `Authorization` header as it is.
    pub(crate) fn new(value: &str) -> Option<Token> {
        (!value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| Token(value.to_owned()))
    }

    /// The token as written, to send.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `presented` is this token. For a guess of the right length the comparison
    /// takes the same time wherever the first differing byte is, so response times do not
    /// reveal how much of a guess was right; a guess of another length is refused at once,
    /// which tells only the length.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_itself() {
        let token = Token::new("s3cret-Token").expect("visible ASCII");
        assert!(token.matches(b"s3cret-Token"));
        for guess in [
            &b"s3cret-Tokem"[..],
            b"S3cret-Token",
            b"s3cret",
            b"s3cret-Token-and-more",
            b"",
        ] {
            assert!(
                !token.matches(guess),
                "{:?}",
                String::from_utf8_lossy(guess)
            );
        }
    }

    #[test]
    fn tokens_that_cannot_travel_in_a_header_are_refused() {
        for bad in ["", "a b", "tab\there", "naïve"] {
            assert_eq!(Token::new(bad), None, "{bad:?}");
        }
    }
}
