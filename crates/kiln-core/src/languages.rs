//! The languages kiln runs programs in: one table, pure data and parsing.
//!
//! Owns, for each of the eight languages (`python`, `node`, `ruby`, `go`, `rust`, `c`, `cpp`,
//! `bash`): its id, the names it is also asked for by (the aliases of the code-execution
//! service cloude, `py`, `js`/`javascript`, `rs`, `golang`, `c++`, plus obvious ones), the
//! built-in image it runs in (`images/<image>.toml`), the file a program is written to, the
//! command that compiles it (compiled languages only), the command that runs it, and the
//! command that prints the toolchain's version.
//!
//! Must not: do I/O, start sandboxes or know about jobs. A caller (the jobs API, an e2e test)
//! runs the commands itself:
//!
//! ```text
//!  workdir/                       1. write the program to   workdir/<source_file>
//!    main.go  ← the program       2. compile (if any):      cd workdir && <compile argv>
//!    main     ← compile's output     exit ≠ 0 → a compile error (its output is the compiler's)
//!                                 3. run:                   cd workdir && <run argv>
//!                                    the program's stdin, stdout, stderr and exit code
//! ```
//!
//! Invariants (unit-tested below): ids and aliases are lowercase and unique across the
//! table, so [`Language::parse`] is unambiguous; every argv is non-empty and names paths
//! relative to the working directory only; a compiled language's run command executes what
//! its compile command wrote; every image is a built-in recipe of `kiln-image`.
//!
//! ```
//! use kiln_core::languages::Language;
//!
//! let lang = Language::parse("golang").unwrap();
//! assert_eq!(lang, Language::Go);
//! assert_eq!(lang.image(), "go");
//! assert_eq!(lang.source_file(), "main.go");
//! assert_eq!(lang.compile(), Some(&["go", "build", "-o", "main", "main.go"][..]));
//! assert_eq!(lang.run(), ["./main"]);
//! assert!(Language::parse("cobol").unwrap_err().to_string().contains("python"));
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A language kiln runs programs in. Serialized as its id (`"cpp"`); deserialized through
/// [`Language::parse`], so aliases are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Language {
    /// CPython 3 (Debian bookworm: 3.11).
    Python,
    /// Node.js (bookworm: 18).
    Node,
    /// Ruby (bookworm: 3.1).
    Ruby,
    /// Go (bookworm: 1.19), one file built with `go build`.
    Go,
    /// Rust (bookworm: rustc 1.63), one file built with `rustc`, no cargo.
    Rust,
    /// C (bookworm: GCC 12).
    C,
    /// C++17 (bookworm: G++ 12).
    Cpp,
    /// Bash (bookworm: 5.2) with Debian's Essential tools.
    Bash,
}

/// Everything the table says about one language; [`Language::info`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanguageInfo {
    /// The language.
    pub language: Language,
    /// Canonical id: what [`Language`] serializes as and `Display` prints.
    pub id: &'static str,
    /// Human-readable name, e.g. `"C++"`.
    pub display_name: &'static str,
    /// Other names [`Language::parse`] accepts (lowercase).
    pub aliases: &'static [&'static str],
    /// Name of the built-in image (`images/<image>.toml`) programs run in.
    pub image: &'static str,
    /// File name the program is written to, in the working directory.
    pub source_file: &'static str,
    /// argv compiling `source_file` in the working directory (`None`: interpreted). A
    /// non-zero exit is a compile error; the program is not run.
    pub compile: Option<&'static [&'static str]>,
    /// argv running the program in the working directory (after `compile`, if any).
    pub run: &'static [&'static str],
    /// argv printing the toolchain's version; the first line of its stdout says it.
    pub version: &'static [&'static str],
    /// argv running the toolchain once on nothing: a warm pool's warm-up for the language,
    /// so that the emulator has translated the interpreter's start before a job arrives
    /// (compiled languages: the compiler's start; their images warm a whole compile before
    /// the snapshot is captured).
    pub warmup: &'static [&'static str],
}

/// The table, in presentation order (the order of [`Language::all`]).
const TABLE: [LanguageInfo; 8] = [
    LanguageInfo {
        language: Language::Python,
        id: "python",
        display_name: "Python",
        aliases: &["py", "python3", "cpython"],
        image: "python",
        source_file: "main.py",
        compile: None,
        run: &["python3", "main.py"],
        version: &["python3", "--version"],
        warmup: &["python3", "-c", "pass"],
    },
    LanguageInfo {
        language: Language::Node,
        id: "node",
        display_name: "Node.js",
        aliases: &["js", "javascript", "nodejs", "node.js"],
        image: "node",
        source_file: "main.js",
        compile: None,
        run: &["node", "main.js"],
        version: &["node", "--version"],
        warmup: &["node", "-e", "0"],
    },
    LanguageInfo {
        language: Language::Ruby,
        id: "ruby",
        display_name: "Ruby",
        aliases: &["rb"],
        image: "ruby",
        source_file: "main.rb",
        compile: None,
        run: &["ruby", "main.rb"],
        version: &["ruby", "--version"],
        warmup: &["ruby", "-e", "0"],
    },
    LanguageInfo {
        language: Language::Go,
        id: "go",
        display_name: "Go",
        aliases: &["golang"],
        image: "go",
        source_file: "main.go",
        compile: Some(&["go", "build", "-o", "main", "main.go"]),
        run: &["./main"],
        version: &["go", "version"],
        warmup: &["go", "version"],
    },
    LanguageInfo {
        language: Language::Rust,
        id: "rust",
        display_name: "Rust",
        aliases: &["rs"],
        image: "rust",
        source_file: "main.rs",
        compile: Some(&["rustc", "--edition", "2021", "-o", "main", "main.rs"]),
        run: &["./main"],
        version: &["rustc", "--version"],
        warmup: &["rustc", "--version"],
    },
    LanguageInfo {
        language: Language::C,
        id: "c",
        display_name: "C",
        aliases: &["gcc"],
        image: "c",
        source_file: "main.c",
        compile: Some(&["gcc", "-O2", "-o", "main", "main.c", "-lm"]),
        run: &["./main"],
        version: &["gcc", "--version"],
        warmup: &["gcc", "--version"],
    },
    LanguageInfo {
        language: Language::Cpp,
        id: "cpp",
        display_name: "C++",
        aliases: &["c++", "cxx", "g++"],
        image: "cpp",
        source_file: "main.cpp",
        compile: Some(&["g++", "-O2", "-std=c++17", "-o", "main", "main.cpp"]),
        run: &["./main"],
        version: &["g++", "--version"],
        warmup: &["g++", "--version"],
    },
    LanguageInfo {
        language: Language::Bash,
        id: "bash",
        display_name: "Bash",
        aliases: &["sh", "shell"],
        image: "bash",
        source_file: "main.sh",
        compile: None,
        run: &["bash", "main.sh"],
        version: &["bash", "--version"],
        warmup: &["bash", "-c", ":"],
    },
];

/// Every language, in presentation order.
const ALL: [Language; 8] = [
    Language::Python,
    Language::Node,
    Language::Ruby,
    Language::Go,
    Language::Rust,
    Language::C,
    Language::Cpp,
    Language::Bash,
];

/// Why a language name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LanguageError {
    /// The name is neither an id nor an alias of the table.
    #[error("unknown language `{given}` (known: {known})")]
    Unknown {
        /// The name as given.
        given: String,
        /// Every id with its aliases, e.g. `python (py, python3, cpython), node (...), ...`.
        known: String,
    },
}

impl Language {
    /// Every language, in presentation order.
    pub fn all() -> &'static [Language] {
        &ALL
    }

    /// The language named `name`: an id or an alias, ASCII case-insensitive, surrounding
    /// whitespace ignored (`"Python"`, `" py "`, `"C++"`, `"golang"`).
    pub fn parse(name: &str) -> Result<Language, LanguageError> {
        let wanted = name.trim().to_ascii_lowercase();
        TABLE
            .iter()
            .find(|i| i.id == wanted || i.aliases.contains(&wanted.as_str()))
            .map(|i| i.language)
            .ok_or_else(|| LanguageError::Unknown {
                given: name.to_owned(),
                known: Self::known_names(),
            })
    }

    /// Every id with its aliases, for messages: `python (py, python3, cpython), ...`.
    pub fn known_names() -> String {
        TABLE
            .iter()
            .map(|i| format!("{} ({})", i.id, i.aliases.join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The table's row of this language.
    pub fn info(self) -> &'static LanguageInfo {
        // The table is in the enum's order (checked by a unit test).
        &TABLE[self as usize]
    }

    /// Canonical id, e.g. `"cpp"`.
    pub fn id(self) -> &'static str {
        self.info().id
    }

    /// Human-readable name, e.g. `"C++"`.
    pub fn display_name(self) -> &'static str {
        self.info().display_name
    }

    /// Other names [`Language::parse`] accepts.
    pub fn aliases(self) -> &'static [&'static str] {
        self.info().aliases
    }

    /// Name of the built-in image programs run in.
    pub fn image(self) -> &'static str {
        self.info().image
    }

    /// File name the program is written to, in the working directory.
    pub fn source_file(self) -> &'static str {
        self.info().source_file
    }

    /// argv compiling the program in the working directory; `None` for interpreted
    /// languages.
    pub fn compile(self) -> Option<&'static [&'static str]> {
        self.info().compile
    }

    /// Whether a program is compiled before it runs.
    pub fn is_compiled(self) -> bool {
        self.info().compile.is_some()
    }

    /// argv running the program in the working directory.
    pub fn run(self) -> &'static [&'static str] {
        self.info().run
    }

    /// argv printing the toolchain's version (first line of stdout).
    pub fn version(self) -> &'static [&'static str] {
        self.info().version
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Language {
    type Err = LanguageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Language::parse(s)
    }
}

impl From<Language> for &'static str {
    fn from(l: Language) -> Self {
        l.id()
    }
}

impl TryFrom<String> for Language {
    type Error = LanguageError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Language::parse(&s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn table_is_in_enum_order_and_all_lists_every_language_once() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(row.language as usize, i, "{}", row.id);
            assert_eq!(row.language.info(), row);
        }
        assert_eq!(Language::all().len(), TABLE.len());
        for (lang, row) in Language::all().iter().zip(&TABLE) {
            assert_eq!(*lang, row.language);
        }
        let ids: Vec<&str> = Language::all().iter().map(|l| l.id()).collect();
        assert_eq!(
            ids,
            ["python", "node", "ruby", "go", "rust", "c", "cpp", "bash"]
        );
    }

    #[test]
    fn parse_every_id_and_alias_round_trips() {
        for lang in Language::all() {
            assert_eq!(Language::parse(lang.id()), Ok(*lang));
            assert_eq!(lang.id().parse::<Language>(), Ok(*lang));
            for alias in lang.aliases() {
                assert_eq!(Language::parse(alias), Ok(*lang), "{alias}");
            }
        }
    }

    #[test]
    fn parse_cloude_aliases_name_their_languages() {
        for (alias, lang) in [
            ("py", Language::Python),
            ("js", Language::Node),
            ("javascript", Language::Node),
            ("rs", Language::Rust),
            ("golang", Language::Go),
            ("c++", Language::Cpp),
        ] {
            assert_eq!(Language::parse(alias), Ok(lang), "{alias}");
        }
    }

    #[test]
    fn parse_ignores_case_and_surrounding_whitespace() {
        assert_eq!(Language::parse("Python"), Ok(Language::Python));
        assert_eq!(Language::parse("  JavaScript\n"), Ok(Language::Node));
        assert_eq!(Language::parse("C++"), Ok(Language::Cpp));
        assert_eq!(Language::parse("C"), Ok(Language::C));
    }

    #[test]
    fn parse_unknown_names_every_known_language() {
        for bad in ["cobol", "", "pyth", "c#", "python 3", "node js"] {
            let err = Language::parse(bad).expect_err(bad);
            let LanguageError::Unknown { given, .. } = &err;
            assert_eq!(given, bad);
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("unknown language `{bad}`")),
                "{msg}"
            );
            for lang in Language::all() {
                assert!(msg.contains(lang.id()), "{msg} lacks {lang}");
            }
            assert!(msg.contains("golang") && msg.contains("c++"), "{msg}");
        }
    }

    #[test]
    fn ids_and_aliases_are_lowercase_and_unique() {
        let mut seen = BTreeSet::new();
        for row in &TABLE {
            for name in std::iter::once(&row.id).chain(row.aliases) {
                assert_eq!(*name, name.to_ascii_lowercase(), "{name}");
                assert_eq!(*name, name.trim(), "{name}");
                assert!(seen.insert(*name), "{name} names two languages");
            }
        }
    }

    #[test]
    fn commands_are_relative_to_the_working_directory() {
        for lang in Language::all() {
            let src = lang.source_file();
            assert!(
                !src.contains('/') && src.starts_with("main."),
                "{lang}: {src}"
            );
            let argvs = [
                lang.compile(),
                Some(lang.run()),
                Some(lang.version()),
                Some(lang.info().warmup),
            ];
            for argv in argvs.into_iter().flatten() {
                assert!(!argv.is_empty(), "{lang}");
                assert!(
                    argv.iter().skip(1).all(|a| !a.starts_with('/')),
                    "{lang}: {argv:?}"
                );
            }
            match lang.compile() {
                Some(compile) => {
                    assert!(lang.is_compiled());
                    assert!(compile.contains(&src), "{lang} compiles {src}: {compile:?}");
                    let out = compile
                        .windows(2)
                        .find(|w| w[0] == "-o")
                        .map(|w| w[1])
                        .expect("an -o output");
                    assert_eq!(lang.run(), [format!("./{out}").as_str()], "{lang}");
                }
                None => {
                    assert!(!lang.is_compiled());
                    assert_eq!(lang.run().last(), Some(&src), "{lang} runs {src}");
                }
            }
        }
    }

    #[test]
    fn every_image_is_a_builtin_recipe() {
        for lang in Language::all() {
            let recipe = kiln_image::builtin(lang.image())
                .unwrap_or_else(|| panic!("{lang}: no built-in image {}", lang.image()));
            assert!(recipe.test.is_some(), "{lang}");
        }
        let compiled: Vec<&str> = Language::all()
            .iter()
            .filter(|l| l.is_compiled())
            .map(|l| l.id())
            .collect();
        assert_eq!(compiled, ["go", "rust", "c", "cpp"]);
    }

    #[test]
    fn serde_writes_the_id_and_reads_aliases() {
        assert_eq!(
            serde_json::to_string(&Language::Cpp).expect("json"),
            "\"cpp\""
        );
        let back: Vec<Language> =
            serde_json::from_str(r#"["cpp", "c++", "js", "Py"]"#).expect("parse");
        assert_eq!(
            back,
            [
                Language::Cpp,
                Language::Cpp,
                Language::Node,
                Language::Python
            ]
        );
        let err = serde_json::from_str::<Language>("\"cobol\"").expect_err("unknown");
        assert!(
            err.to_string().contains("unknown language `cobol`"),
            "{err}"
        );
        assert_eq!(Language::Cpp.to_string(), "cpp");
        assert_eq!(Language::Cpp.display_name(), "C++");
    }
}
