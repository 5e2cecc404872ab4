//! The private env's limits and the variable name rule. The publisher
//! checks them before sending (so that a bad variable is its caller's
//! error, not a rejection that ends the session) and the broker checks them
//! again on everything it receives.

/// Longest variable name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
/// Most variables in one private env.
pub const MAX_VARS: usize = 1000;
/// Most bytes of names and values together in one private env.
pub const MAX_TOTAL_BYTES: usize = 256 * 1024;

/// What is wrong with a variable name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// Longer than [`MAX_NAME_BYTES`] (its length).
    TooLong(usize),
    /// Not `[A-Za-z_][A-Za-z0-9_]*`.
    Characters,
}

/// What is wrong with a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueProblem {
    /// Longer than [`MAX_VALUE_BYTES`] (its length).
    TooLong(usize),
    /// Holds a NUL byte, which no process environment can carry.
    Nul,
}

/// Checks a name: `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME_BYTES`].
pub fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameProblem::TooLong(name.len()));
    }
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(NameProblem::Characters)
    }
}

/// Checks a value: at most [`MAX_VALUE_BYTES`], no NUL byte.
pub fn check_value(value: &str) -> Result<(), ValueProblem> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ValueProblem::TooLong(value.len()));
    }
    if value.contains('\0') {
        return Err(ValueProblem::Nul);
    }
    Ok(())
}

/// Bytes of names and values together, as [`MAX_TOTAL_BYTES`] counts them.
pub fn total_bytes<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    vars.into_iter()
        .map(|(name, value)| name.len() + value.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_shell_rule() {
        for good in ["A", "_", "AUTH_TOKEN_FOR_CUSTOM_DATABASE", "a1", "_9"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_name(""), Err(NameProblem::Empty));
        for bad in ["1A", "A-B", "A B", "Ä", "A=B", "A\0"] {
            assert_eq!(check_name(bad), Err(NameProblem::Characters), "{bad:?}");
        }
        let long = "A".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            check_name(&long),
            Err(NameProblem::TooLong(MAX_NAME_BYTES + 1))
        );
        assert_eq!(check_name(&long[1..]), Ok(()));
    }

    #[test]
    fn values_are_bounded_and_nul_free() {
        assert_eq!(check_value(""), Ok(()));
        assert_eq!(check_value(&"x".repeat(MAX_VALUE_BYTES)), Ok(()));
        assert_eq!(
            check_value(&"x".repeat(MAX_VALUE_BYTES + 1)),
            Err(ValueProblem::TooLong(MAX_VALUE_BYTES + 1))
        );
        assert_eq!(check_value("a\0b"), Err(ValueProblem::Nul));
        assert_eq!(total_bytes([("AB", "cde"), ("F", "")]), 6);
    }
}
