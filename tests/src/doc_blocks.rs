//! The shell blocks of a marked README section, which tests run verbatim.
//!
//! A section is marked `<!-- NAME: begin … -->` … `<!-- NAME: end -->`;
//! inside it, each ```sh block is one [`ShBlock`], and a block right after
//! `<!-- NAME: background -->` is started and left running while the later
//! blocks run (a server in its own terminal).

/// One ```sh block of a marked section.
#[derive(Debug, PartialEq)]
pub struct ShBlock {
    /// The block's lines.
    pub script: String,
    /// Right after a `<!-- NAME: background -->` comment.
    pub background: bool,
}

/// The text between `<!-- NAME: begin` and `<!-- NAME: end -->`.
pub fn section<'a>(doc: &'a str, name: &str) -> &'a str {
    let start = doc
        .find(&format!("<!-- {name}: begin"))
        .unwrap_or_else(|| panic!("the document has no `<!-- {name}: begin` marker"));
    let end = doc
        .find(&format!("<!-- {name}: end -->"))
        .unwrap_or_else(|| panic!("the document has no `<!-- {name}: end -->` marker"));
    &doc[start..end]
}

/// The ```sh blocks of `text` (a [`section`]), in order, with their
/// `<!-- NAME: background -->` marks.
pub fn sh_blocks(text: &str, name: &str) -> Vec<ShBlock> {
    let background_mark = format!("<!-- {name}: background -->");
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    let mut background = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == background_mark {
            background = true;
        } else if trimmed == "```sh" {
            let script: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(ShBlock {
                script: script.join("\n"),
                background,
            });
            background = false;
        } else if !trimmed.is_empty() {
            background = false;
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_found_with_their_background_marks() {
        let doc = "x\n<!-- t: begin\nwhy\n-->\n```sh\na\nb\n```\n<!-- t: background -->\n```sh\nwatch\n```\n\n```console\n$ x\n```\n```sh\nc\n```\n<!-- t: end -->\n```sh\nafter\n```\n";
        let blocks = sh_blocks(section(doc, "t"), "t");
        let scripts: Vec<(&str, bool)> = blocks
            .iter()
            .map(|b| (b.script.as_str(), b.background))
            .collect();
        assert_eq!(scripts, [("a\nb", false), ("watch", true), ("c", false)]);
    }
}
