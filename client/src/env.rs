//! The private environment: variables the user hands to the cluster's
//! processes (`--env KEY=VALUE`, `--env-file F`).
//!
//! Everything here is parsed and validated on the user's machine, before it
//! is sent, so that a typo is reported with a file name and a line number
//! instead of a gRPC status from the broker. The limits and the name rule
//! are the broker's: both sides take them from `credstream_proto::rules::env`.
//!
//! Values are secrets: no error message, log line or `Debug` output ever
//! contains one. Errors name the source (`--env`, a file and line) and, when
//! it is safe, the variable *name*.
//!
//! The dotenv dialect is the common one (python-dotenv, docker compose):
//! `#` comments, blank lines, an optional `export ` prefix, `KEY=VALUE` with
//! optional spaces around `=`, unquoted values ending at a ` #` comment,
//! single-quoted values taken literally, double-quoted values with `\n`,
//! `\r`, `\t`, `\"` and `\\` escapes. Quoted values may span lines (a PEM key).
//! There is deliberately no `$VAR` expansion: a secret containing `$` must
//! arrive exactly as written.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use credstream_proto::rules::env::{self as env_rules, NameProblem, ValueProblem};
use credstream_proto::v1::EnvVar;

/// Longest accepted variable name, in bytes.
pub const MAX_NAME_BYTES: usize = env_rules::MAX_NAME_BYTES;
/// Longest accepted value, in bytes.
pub const MAX_VALUE_BYTES: usize = env_rules::MAX_VALUE_BYTES;
/// Most variables in one private environment.
pub const MAX_VARS: usize = env_rules::MAX_VARS;
/// Most bytes of names and values together in one private environment.
pub const MAX_TOTAL_BYTES: usize = env_rules::MAX_TOTAL_BYTES;

/// Where a variable came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvSource {
    /// A `--env KEY=VALUE` argument.
    Argument,
    /// A line of a dotenv file.
    File {
        /// The file as given.
        path: PathBuf,
        /// The 1-based line where the assignment starts.
        line: usize,
    },
}

impl fmt::Display for EnvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvSource::Argument => f.write_str("--env"),
            EnvSource::File { path, line } => write!(f, "{}:{line}", path.display()),
        }
    }
}

/// Why a private environment could not be built. No variant carries a value.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A single assignment is malformed; the message says what to change.
    #[error("{location}: {problem}")]
    Invalid {
        /// Where the bad assignment is.
        location: EnvSource,
        /// What is wrong, without the value.
        problem: String,
    },
    /// A dotenv file could not be read.
    #[error("cannot read env file {}: {error}", path.display())]
    Read {
        /// The file as given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        error: std::io::Error,
    },
    /// The whole environment is over one of the broker's limits.
    #[error("private env too large: {0}")]
    TooLarge(String),
}

fn invalid(location: EnvSource, problem: impl Into<String>) -> EnvError {
    EnvError::Invalid {
        location,
        problem: problem.into(),
    }
}

/// Checks a variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most
/// [`MAX_NAME_BYTES`]. The error text is meant to follow "invalid name".
pub fn validate_name(name: &str) -> Result<(), String> {
    match env_rules::check_name(name) {
        Ok(()) => Ok(()),
        Err(NameProblem::Empty) => Err("empty variable name".into()),
        Err(NameProblem::TooLong(len)) => Err(format!(
            "variable name is {len} bytes long, at most {MAX_NAME_BYTES} are allowed"
        )),
        Err(NameProblem::Characters) => {
            // The name is shown (truncated): it is what the user typed
            // before `=`, never the value.
            let shown: String = name.chars().take(64).collect();
            Err(format!(
                "invalid variable name {shown:?}: use letters, digits and `_`, not starting with a digit"
            ))
        }
    }
}

/// Checks a value: at most [`MAX_VALUE_BYTES`], no NUL byte. The error
/// names the variable, never the value.
pub fn validate_value(name: &str, value: &str) -> Result<(), String> {
    match env_rules::check_value(value) {
        Ok(()) => Ok(()),
        Err(ValueProblem::TooLong(len)) => Err(format!(
            "the value of {name} is {len} bytes long, at most {MAX_VALUE_BYTES} are allowed"
        )),
        Err(ValueProblem::Nul) => Err(format!("the value of {name} contains a NUL byte")),
    }
}

fn checked(source: EnvSource, name: &str, value: String) -> Result<EnvVar, EnvError> {
    validate_name(name).map_err(|problem| invalid(source.clone(), problem))?;
    validate_value(name, &value).map_err(|problem| invalid(source, problem))?;
    Ok(EnvVar {
        name: name.to_owned(),
        value,
    })
}

/// Parses one `--env KEY=VALUE` argument. The value is everything after the
/// first `=`, taken literally (the shell already removed quotes).
///
/// Usable as a clap `value_parser`.
pub fn parse_assignment(arg: &str) -> Result<EnvVar, EnvError> {
    let Some((name, value)) = arg.split_once('=') else {
        // Not echoed: a value pasted without `KEY=` would be a secret.
        return Err(invalid(
            EnvSource::Argument,
            "expected KEY=VALUE (the argument has no `=`)",
        ));
    };
    checked(EnvSource::Argument, name, value.to_owned())
}

/// Reads and parses a dotenv file (see the module documentation for the
/// syntax).
pub fn read_dotenv(path: &Path) -> Result<Vec<EnvVar>, EnvError> {
    let text = std::fs::read_to_string(path).map_err(|error| EnvError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_dotenv(path, &text)
}

/// Parses dotenv text; `path` is only used in error messages. A name that
/// appears twice keeps its last value, in the position of its first.
pub fn parse_dotenv(path: &Path, text: &str) -> Result<Vec<EnvVar>, EnvError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut vars: Vec<EnvVar> = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let start = index;
        let source = EnvSource::File {
            path: path.to_owned(),
            line: start + 1,
        };
        let line = lines[index].trim_start();
        index += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = match line.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
            _ => line,
        };
        let Some((name, rest)) = line.split_once('=') else {
            return Err(invalid(source, "expected KEY=VALUE (the line has no `=`)"));
        };
        let name = name.trim_end();
        validate_name(name).map_err(|problem| invalid(source.clone(), problem))?;
        let rest = rest.trim_start();
        let value = match rest.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                let (value, after, consumed) = quoted(&rest[1..], quote, &lines[index..])
                    .ok_or_else(|| {
                        invalid(
                            source.clone(),
                            format!("the value of {name} has no closing {quote}"),
                        )
                    })?;
                index += consumed;
                let after = after.trim_start();
                if !(after.is_empty() || after.starts_with('#')) {
                    let end = EnvSource::File {
                        path: path.to_owned(),
                        line: start + 1 + consumed,
                    };
                    return Err(invalid(
                        end,
                        format!(
                            "unexpected text after the closing {quote} of {name} (only a `# comment` may follow)"
                        ),
                    ));
                }
                value
            }
            _ => unquoted(rest).to_owned(),
        };
        let var = checked(source, name, value)?;
        match vars.iter_mut().find(|v| v.name == var.name) {
            Some(existing) => existing.value = var.value.clone(),
            None => vars.push(var),
        }
    }
    Ok(vars)
}

/// An unquoted value ends at a `#` preceded by whitespace; surrounding
/// whitespace is not part of it.
fn unquoted(rest: &str) -> &str {
    let mut end = rest.len();
    let bytes = rest.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            end = i;
            break;
        }
    }
    rest[..end].trim_end()
}

/// Reads a quoted value starting just after the opening quote, continuing on
/// the following lines if needed. Returns the value, the text after the
/// closing quote and how many further lines were consumed; `None` if the
/// quote never closes.
fn quoted<'a>(first: &'a str, quote: char, more: &[&'a str]) -> Option<(String, &'a str, usize)> {
    let mut value = String::new();
    let mut line = first;
    let mut consumed = 0;
    loop {
        let mut chars = line.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                return Some((value, &line[i + c.len_utf8()..], consumed));
            }
            if c == '\\' && quote == '"' {
                match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 'r')) => value.push('\r'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => value.push('\\'),
                }
                continue;
            }
            value.push(c);
        }
        let next = more.get(consumed)?;
        consumed += 1;
        value.push('\n');
        line = next;
    }
}

/// Builds the private environment from dotenv files (in order) and then
/// `--env` arguments: a later assignment of the same name wins. Checks the
/// broker's limits on the result.
pub fn collect(files: &[PathBuf], assignments: &[EnvVar]) -> Result<Vec<EnvVar>, EnvError> {
    let mut vars: Vec<EnvVar> = Vec::new();
    let mut positions: HashMap<String, usize> = HashMap::new();
    let mut add = |var: EnvVar, vars: &mut Vec<EnvVar>| match positions.get(&var.name) {
        Some(&at) => vars[at].value = var.value.clone(),
        None => {
            positions.insert(var.name.clone(), vars.len());
            vars.push(var);
        }
    };
    for path in files {
        for var in read_dotenv(path)? {
            add(var, &mut vars);
        }
    }
    for var in assignments {
        add(var.clone(), &mut vars);
    }
    check_limits(&vars)?;
    Ok(vars)
}

/// Checks the broker's limits on a whole environment.
pub fn check_limits(vars: &[EnvVar]) -> Result<(), EnvError> {
    if vars.len() > MAX_VARS {
        return Err(EnvError::TooLarge(format!(
            "{} variables, at most {MAX_VARS} are allowed",
            vars.len()
        )));
    }
    let total = env_rules::total_bytes(vars.iter().map(|v| (v.name.as_str(), v.value.as_str())));
    if total > MAX_TOTAL_BYTES {
        return Err(EnvError::TooLarge(format!(
            "{total} bytes of names and values, at most {MAX_TOTAL_BYTES} are allowed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(String, String)>, EnvError> {
        parse_dotenv(Path::new("test.env"), text).map(|vars| {
            vars.iter()
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect()
        })
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn assignment_splits_at_first_equals() {
        let var = parse_assignment("DSN=postgres://u:p@h/db?a=b").unwrap();
        assert_eq!(var.name, "DSN");
        assert_eq!(var.value, "postgres://u:p@h/db?a=b");
        assert_eq!(parse_assignment("EMPTY=").unwrap().value, "");
    }

    #[test]
    fn assignment_errors_never_echo_the_value() {
        let err = parse_assignment("sk-live-secret-token")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = parse_assignment("1BAD=hunter2").unwrap_err().to_string();
        assert!(err.contains("1BAD") && !err.contains("hunter2"), "{err}");
        let err = parse_assignment("NUL=a\0hunter2").unwrap_err().to_string();
        assert!(
            err.contains("NUL byte") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("_A1").is_ok());
        assert!(validate_name("a").is_ok());
        for bad in ["", "1A", "A-B", "A B", "É", &"A".repeat(MAX_NAME_BYTES + 1)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dotenv_dialect() {
        let text = "\u{feff}# a comment\n\
                    \n\
                    PLAIN=value\n\
                    export EXPORTED=yes\n\
                    SPACED = around equals  \n\
                    COMMENTED=abc # trailing comment\n\
                    HASH=abc#not-a-comment\n\
                    SINGLE='lit\\n $HOME # kept'\n\
                    DOUBLE=\"a\\nb\\t\\\"q\\\" \\\\ \\x\" # comment\n\
                    CRLF=win\r\n\
                    EMPTY=\n\
                    EMPTY_QUOTED=\"\"\n\
                    exportNOT=1\n\
                    PLAIN=overridden\n";
        assert_eq!(
            parse(text).unwrap(),
            pairs(&[
                ("PLAIN", "overridden"),
                ("EXPORTED", "yes"),
                ("SPACED", "around equals"),
                ("COMMENTED", "abc"),
                ("HASH", "abc#not-a-comment"),
                ("SINGLE", "lit\\n $HOME # kept"),
                ("DOUBLE", "a\nb\t\"q\" \\ \\x"),
                ("CRLF", "win"),
                ("EMPTY", ""),
                ("EMPTY_QUOTED", ""),
                ("exportNOT", "1"),
            ])
        );
    }

    #[test]
    fn quoted_values_span_lines() {
        let text = "KEY=\"-----BEGIN-----\nabc\n-----END-----\"\nNEXT=1\n";
        assert_eq!(
            parse(text).unwrap(),
            pairs(&[
                ("KEY", "-----BEGIN-----\nabc\n-----END-----"),
                ("NEXT", "1")
            ])
        );
    }

    #[test]
    fn errors_carry_line_numbers_and_no_values() {
        let cases = [
            ("A=1\nnot an assignment hunter2\n", "test.env:2:", "no `=`"),
            ("A=1\n\n9X=hunter2\n", "test.env:3:", "9X"),
            (
                "A=1\nB='hunter2\nmore hunter2\n",
                "test.env:2:",
                "no closing '",
            ),
            (
                "A=\"hunter2\" trailing\n",
                "test.env:1:",
                "after the closing",
            ),
            (
                "A=\"x\nhunter2\" trailing\n",
                "test.env:2:",
                "after the closing",
            ),
        ];
        for (text, location, problem) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(location), "{text:?}: {err}");
            assert!(err.contains(problem), "{text:?}: {err}");
            assert!(!err.contains("hunter2"), "{text:?}: {err}");
        }
    }

    #[test]
    fn collect_merges_files_then_arguments_and_checks_limits() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.env");
        let second = dir.path().join("b.env");
        std::fs::write(&first, "A=1\nB=1\n").unwrap();
        std::fs::write(&second, "B=2\nC=2\n").unwrap();
        let vars = collect(
            &[first.clone(), second],
            &[
                parse_assignment("C=3").unwrap(),
                parse_assignment("D=3").unwrap(),
            ],
        )
        .unwrap();
        let got: Vec<_> = vars
            .iter()
            .map(|v| format!("{}={}", v.name, v.value))
            .collect();
        assert_eq!(got, ["A=1", "B=2", "C=3", "D=3"]);

        let missing = collect(&[dir.path().join("nope.env")], &[]).unwrap_err();
        assert!(matches!(missing, EnvError::Read { .. }), "{missing}");

        let many: Vec<EnvVar> = (0..=MAX_VARS)
            .map(|i| EnvVar {
                name: format!("V{i}"),
                value: String::new(),
            })
            .collect();
        assert!(matches!(collect(&[], &many), Err(EnvError::TooLarge(_))));
        let big: Vec<EnvVar> = (0..9)
            .map(|i| EnvVar {
                name: format!("V{i}"),
                value: "x".repeat(MAX_VALUE_BYTES),
            })
            .collect();
        assert!(matches!(collect(&[], &big), Err(EnvError::TooLarge(_))));
    }
}
