//! The eight language images (issue 11) through jobs, driven by kiln-core's language table
//! (`kiln_core::languages`): for each language, a hello world, a program that echoes its
//! stdin, a program that exits 3, a program that never ends (stopped at the job's timeout),
//! one that prints forever (stopped at `max_output`), and (compiled languages) a program that
//! does not compile, whose error must come from the compile step (the program never runs).
//! `GET /v1/languages` must name each toolchain's version.
//!
//! A language's API jobs are submitted at once and then waited for (they run side by side up
//! to the daemon's `KILN_JOB_CONCURRENCY`); the hello world also goes through
//! `kiln job run --language <alias> --code` and the exit 3 through `kiln go --file`, whose
//! exit codes are the program's. The images are built-in recipes: `kiln image build` is a
//! no-op when `scripts/test` built them already, a build otherwise.

use kiln_core::languages::Language;
use kiln_e2e::{Kiln, assert_success, job_submit, job_wait, stderr, stdout, wait_bounded};
use serde_json::{Value, json};
use std::process::Stdio;

/// The programs of one language, and what identifies its toolchain and its compile error.
struct Programs {
    hello: &'static str,
    echo: &'static str,
    exit3: &'static str,
    /// A program that never ends (busy, no output).
    spin: &'static str,
    /// A program that prints lines forever.
    flood: &'static str,
    /// A program the compiler refuses, and a piece of the compiler's message.
    broken: Option<(&'static str, &'static str)>,
    /// A piece of the first line the version command prints.
    version: &'static str,
}

fn programs(lang: Language) -> Programs {
    match lang {
        Language::Python => Programs {
            hello: "print('hello, world')\n",
            echo: "import sys\nsys.stdout.write(sys.stdin.read())\n",
            exit3: "import sys\nprint('bye', file=sys.stderr)\nsys.exit(3)\n",
            spin: "while True:\n    pass\n",
            flood: "while True:\n    print('y' * 100)\n",
            broken: None,
            version: "Python 3.",
        },
        Language::Node => Programs {
            hello: "console.log('hello, world');\n",
            echo: "process.stdin.pipe(process.stdout);\n",
            exit3: "console.error('bye');\nprocess.exit(3);\n",
            spin: "for (;;) {}\n",
            // A loop of console.log would never yield to the event loop that writes to a pipe.
            flood: "const s = 'y'.repeat(100) + '\\n';\n\
                    function w() {\n  while (process.stdout.write(s)) {}\n  process.stdout.once('drain', w);\n}\nw();\n",
            broken: None,
            version: "v18.",
        },
        Language::Ruby => Programs {
            hello: "puts 'hello, world'\n",
            echo: "STDOUT.write(STDIN.read)\n",
            exit3: "STDERR.puts 'bye'\nexit 3\n",
            spin: "loop {}\n",
            flood: "loop { puts 'y' * 100 }\n",
            broken: None,
            version: "ruby 3.",
        },
        Language::Go => Programs {
            hello: "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello, world\") }\n",
            echo: "package main\n\nimport (\n\t\"io\"\n\t\"os\"\n)\n\n\
                   func main() { io.Copy(os.Stdout, os.Stdin) }\n",
            exit3: "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\n\
                    func main() {\n\tfmt.Fprintln(os.Stderr, \"bye\")\n\tos.Exit(3)\n}\n",
            spin: "package main\n\nfunc main() {\n\tfor {\n\t}\n}\n",
            flood: "package main\n\nimport \"fmt\"\n\n\
                    func main() {\n\tfor {\n\t\tfmt.Println(\"yyyyyyyyyyyyyyyy\")\n\t}\n}\n",
            broken: Some((
                "package main\n\nfunc main() { undefinedFunction() }\n",
                "undefined: undefinedFunction",
            )),
            version: "go1.",
        },
        Language::Rust => Programs {
            hello: "fn main() {\n    println!(\"hello, world\");\n}\n",
            echo: "use std::io::{Read, Write};\n\nfn main() {\n    let mut buf = Vec::new();\n    \
                   std::io::stdin().read_to_end(&mut buf).unwrap();\n    \
                   std::io::stdout().write_all(&buf).unwrap();\n}\n",
            exit3: "fn main() {\n    eprintln!(\"bye\");\n    std::process::exit(3);\n}\n",
            spin: "fn main() {\n    loop {}\n}\n",
            flood: "fn main() {\n    loop {\n        println!(\"{}\", \"y\".repeat(100));\n    }\n}\n",
            broken: Some((
                "fn main() {\n    let x: i32 = \"not a number\";\n}\n",
                "mismatched types",
            )),
            version: "rustc 1.",
        },
        Language::C => Programs {
            hello: "#include <stdio.h>\n\nint main(void) {\n    puts(\"hello, world\");\n    return 0;\n}\n",
            echo: "#include <stdio.h>\n\nint main(void) {\n    int c;\n    \
                   while ((c = getchar()) != EOF)\n        putchar(c);\n    return 0;\n}\n",
            exit3: "#include <stdio.h>\n\nint main(void) {\n    fprintf(stderr, \"bye\\n\");\n    \
                    return 3;\n}\n",
            spin: "int main(void) {\n    volatile unsigned long n = 0;\n    for (;;)\n        n++;\n}\n",
            flood: "#include <stdio.h>\n\nint main(void) {\n    for (;;)\n        puts(\"yyyyyyyyyyyyyyyy\");\n}\n",
            broken: Some((
                "int main(void) {\n    return undeclared_variable;\n}\n",
                "undeclared_variable",
            )),
            version: "gcc",
        },
        Language::Cpp => Programs {
            hello: "#include <iostream>\n\nint main() {\n    std::cout << \"hello, world\" << std::endl;\n}\n",
            echo: "#include <iostream>\n\nint main() {\n    std::cout << std::cin.rdbuf();\n}\n",
            exit3: "#include <iostream>\n\nint main() {\n    std::cerr << \"bye\" << std::endl;\n    \
                    return 3;\n}\n",
            spin: "int main() {\n    volatile unsigned long n = 0;\n    for (;;)\n        n++;\n}\n",
            flood: "#include <iostream>\n\nint main() {\n    for (;;)\n        std::cout << \"yyyyyyyyyyyyyyyy\\n\";\n}\n",
            broken: Some((
                "#include <string>\n\nint main() {\n    std::string s = 3.5;\n}\n",
                "conversion from",
            )),
            version: "g++",
        },
        Language::Bash => Programs {
            hello: "echo 'hello, world'\n",
            echo: "cat\n",
            exit3: "echo bye >&2\nexit 3\n",
            spin: "while :; do :; done\n",
            flood: "while :; do echo yyyyyyyyyyyyyyyy; done\n",
            broken: None,
            version: "GNU bash",
        },
    }
}

/// Stdin sent to the echo program: two lines, non-ASCII characters, no final newline.
const ECHO_INPUT: &str = "first line\nh\u{e9}llo \u{2603}\nno newline";

/// The bytes `max_output` lets through for the flood program.
const FLOOD_CAP: usize = 4096;

/// The timeout of the spin program: it covers the compile step as well (compile and run share
/// a job's timeout), and compiling takes 2-13 s under TCG with four jobs at once.
fn spin_timeout(lang: Language) -> u64 {
    if lang.is_compiled() { 30 } else { 3 }
}

/// The job's fields that show what happened, for messages.
fn summary(job: &Value) -> String {
    format!(
        "status {} exit {} signal {} error {}\nstdout: {:.400}\nstderr: {:.400}\ncompile: {}",
        job["status"],
        job["exit_code"],
        job["signal"],
        job["error"],
        job["stdout"].as_str().unwrap_or_default(),
        job["stderr"].as_str().unwrap_or_default(),
        job["compile"]
    )
}

/// A compiled language's program got past its compile step (the checks are about the run).
fn assert_compiled(lang: Language, case: &str, job: &Value) {
    if lang.is_compiled() {
        assert_eq!(
            job["compile"]["exit_code"],
            0,
            "{lang} {case}: {}",
            summary(job)
        );
    } else {
        assert!(job["compile"].is_null(), "{lang} {case}: {}", summary(job));
    }
}

fn check_language(lang: Language) {
    let k = Kiln::shared();
    let p = programs(lang);
    let image = lang.image();
    let out = k.run(&["image", "build", image]);
    assert_success(&out, &format!("kiln image build {image}"));
    let id = lang.id();

    // The API's jobs, submitted at once.
    let mut jobs = vec![
        (
            "echo",
            json!({"language": id, "code": p.echo, "stdin": ECHO_INPUT}),
        ),
        (
            "spin",
            json!({"language": id, "code": p.spin, "timeout": spin_timeout(lang)}),
        ),
        (
            "flood",
            json!({"language": id, "code": p.flood, "max_output": FLOOD_CAP}),
        ),
    ];
    if let Some((broken, _)) = p.broken {
        jobs.push(("broken", json!({"language": id, "code": broken})));
    }
    let submitted: Vec<(&str, String)> = jobs
        .iter()
        .map(|(case, req)| (*case, job_submit(k.home(), req)))
        .collect();

    // The CLI's, beside them: hello by an alias with the code inline, exit 3 from a file.
    let alias = lang.aliases()[0];
    let hello = k
        .cmd(&["job", "run", "--language", alias, "--code", p.hello])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln job run");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(lang.source_file());
    std::fs::write(&file, p.exit3).expect("write program");
    let exit3 = k
        .cmd(&[
            "go",
            "--language",
            id,
            "--file",
            file.to_str().expect("utf-8 path"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln go");

    // Hello world: the program's output and exit code are kiln's.
    let out = wait_bounded(hello, &format!("{lang}: kiln job run hello"), 600);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{lang}: hello\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stdout(&out),
        "hello, world\n",
        "{lang}: hello (stderr: {})",
        stderr(&out)
    );

    // A non-zero exit is the program's, with its stderr.
    let out = wait_bounded(exit3, &format!("{lang}: kiln go exit3"), 600);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{lang}: exit 3\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).lines().any(|l| l == "bye"),
        "{lang}: exit 3's stderr: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "", "{lang}: exit 3's stdout");

    for (case, job_id) in &submitted {
        let job = job_wait(k.home(), job_id, 600);
        let why = summary(&job);
        match *case {
            // Stdin comes back byte for byte.
            "echo" => {
                assert_eq!(job["status"], "succeeded", "{lang} echo: {why}");
                assert_eq!(job["exit_code"], 0, "{lang} echo: {why}");
                assert_eq!(job["stdout"], ECHO_INPUT, "{lang} echo: {why}");
                assert_compiled(lang, case, &job);
            }
            // A program that never ends is stopped at the timeout, saying so.
            "spin" => {
                assert_eq!(job["status"], "timed_out", "{lang} spin: {why}");
                assert_compiled(lang, case, &job);
                let error = job["error"].as_str().unwrap_or_default();
                assert!(
                    error.contains(&format!("timeout of {} s", spin_timeout(lang))),
                    "{lang} spin: {why}"
                );
            }
            // A program that prints forever is stopped at the cap, with exactly that much.
            "flood" => {
                assert_eq!(job["status"], "failed", "{lang} flood: {why}");
                assert_eq!(job["stdout_truncated"], true, "{lang} flood: {why}");
                let out = job["stdout"].as_str().expect("stdout");
                assert_eq!(out.len(), FLOOD_CAP, "{lang} flood: {why}");
                assert!(
                    out.bytes().all(|b| b == b'y' || b == b'\n'),
                    "{lang} flood: {why}"
                );
                assert!(
                    job["error"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("max_output"),
                    "{lang} flood: {why}"
                );
                assert_compiled(lang, case, &job);
            }
            // A compile error is the compile step's; the program never runs.
            "broken" => {
                let (_, message) = p.broken.expect("compiled languages have broken programs");
                assert_eq!(job["status"], "failed", "{lang} broken: {why}");
                let code = job["compile"]["exit_code"].as_i64();
                assert!(code.is_some_and(|c| c != 0), "{lang} broken: {why}");
                let output = job["compile"]["output"].as_str().unwrap_or_default();
                assert!(output.contains(message), "{lang} broken: {why}");
                assert!(output.contains(lang.source_file()), "{lang} broken: {why}");
                assert!(job["exit_code"].is_null(), "{lang} broken: {why}");
                assert_eq!(job["stdout"], "", "{lang} broken: {why}");
            }
            other => unreachable!("no case {other}"),
        }
    }
}

/// `GET /v1/languages` lists the eight languages in the table's order, each built and naming
/// its toolchain's version.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn languages_list_versions() {
    let k = Kiln::shared();
    for lang in Language::all() {
        let out = k.run(&["image", "build", lang.image()]);
        assert_success(&out, &format!("kiln image build {}", lang.image()));
    }
    // Asking each image for its version the first time boots a sandbox of each.
    let r = kiln_e2e::api_call(k.home(), "GET", "/v1/languages", b"", 600);
    assert_eq!(r.status, 200, "{}", r.body);
    let list: Value = serde_json::from_str(&r.body).expect("languages json");
    let entries = list["languages"].as_array().expect("languages array");
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default())
        .collect();
    let want: Vec<&str> = Language::all().iter().map(|l| l.id()).collect();
    assert_eq!(ids, want, "{list:#}");
    for (lang, e) in Language::all().iter().zip(entries) {
        assert_eq!(e["image_built"], true, "{lang}: {e:#}");
        assert_eq!(e["compiled"], lang.is_compiled(), "{lang}: {e:#}");
        let version = e["version"].as_str().unwrap_or_default();
        assert!(version.contains(programs(*lang).version), "{lang}: {e:#}");
    }
}

macro_rules! language_tests {
    ($($name:ident => $lang:expr),* $(,)?) => {$(
        #[test]
        #[ignore = "boots VMs: run by scripts/test"]
        fn $name() {
            check_language($lang);
        }
    )*};
}

language_tests! {
    language_python_hello_stdin_exit_timeout_output_cap => Language::Python,
    language_node_hello_stdin_exit_timeout_output_cap => Language::Node,
    language_ruby_hello_stdin_exit_timeout_output_cap => Language::Ruby,
    language_bash_hello_stdin_exit_timeout_output_cap => Language::Bash,
    language_go_compile_error_hello_stdin_exit_timeout_output_cap => Language::Go,
    language_rust_compile_error_hello_stdin_exit_timeout_output_cap => Language::Rust,
    language_c_compile_error_hello_stdin_exit_timeout_output_cap => Language::C,
    language_cpp_compile_error_hello_stdin_exit_timeout_output_cap => Language::Cpp,
}
