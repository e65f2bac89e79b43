//! The eight language images (issue 11) against real VMs, driven by kiln-core's language
//! table (`kiln_core::languages`): for each language, one sandbox of its image runs the
//! table's compile and run commands on a hello world, a program that echoes its stdin, a
//! program that exits 3, a program that never ends (killed at `--timeout`), one that prints
//! forever (killed at `--max-output`), and (compiled languages) a program that does not
//! compile, whose error must come from the compile step (no program is left for the run
//! step). The table's version command must name the toolchain.
//!
//! The programs are written on the host and copied into the sandbox with `kiln cp` (one
//! directory per check); every command runs with `kiln exec --workdir` in that directory,
//! exactly as the table's commands say. The images are built-in recipes: `kiln image build`
//! is a no-op when `scripts/test` built them already, a build otherwise.

use std::path::Path;
use std::process::Output;

use kiln_core::languages::Language;
use kiln_e2e::{Kiln, assert_success, stderr, stdout};

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

/// Runs the table's `argv` in `/root/lang/<case>` of sandbox `id`, with `stdin`.
fn exec(k: &Kiln, id: &str, case: &str, argv: &[&str], stdin: &[u8]) -> Output {
    let workdir = format!("/root/lang/{case}");
    let mut args = vec!["exec", id, "--workdir", &workdir, "--"];
    args.extend_from_slice(argv);
    k.run_with_stdin(&args, stdin)
}

/// `what` of `lang` exited with `code`; the message shows its output.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

/// Compiles (if the language is compiled) and runs the program of `case` with `stdin`.
fn compile_and_run(k: &Kiln, id: &str, lang: Language, case: &str, stdin: &[u8]) -> Output {
    if let Some(compile) = lang.compile() {
        let out = exec(k, id, case, compile, b"");
        assert_success(&out, &format!("{lang}: compile {case}"));
    }
    exec(k, id, case, lang.run(), stdin)
}

/// Compiles the program of `case` (if compiled) and runs it with the `kiln exec` options
/// `opts` (e.g. `--timeout 3`) and no stdin.
fn compile_and_run_with(k: &Kiln, id: &str, lang: Language, case: &str, opts: &[&str]) -> Output {
    let workdir = format!("/root/lang/{case}");
    if let Some(compile) = lang.compile() {
        let out = exec(k, id, case, compile, b"");
        assert_success(&out, &format!("{lang}: compile {case}"));
    }
    let mut args = vec!["exec", id, "--no-stdin", "--workdir", &workdir];
    args.extend_from_slice(opts);
    args.push("--");
    args.extend_from_slice(lang.run());
    k.run(&args)
}

fn check_language(lang: Language) {
    let k = Kiln::shared();
    let p = programs(lang);
    let image = lang.image();
    let out = k.run(&["image", "build", image]);
    assert_success(&out, &format!("kiln image build {image}"));

    // The programs, one directory per check, copied in at once.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("lang");
    let mut cases = vec![
        ("hello", p.hello),
        ("echo", p.echo),
        ("exit3", p.exit3),
        ("spin", p.spin),
        ("flood", p.flood),
    ];
    if let Some((broken, _)) = p.broken {
        cases.push(("broken", broken));
    }
    for (case, source) in &cases {
        let d = root.join(case);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(lang.source_file()), source).expect("write program");
    }
    let id = k.create(image);
    let out = k.run(&["cp", path_str(&root), &format!("{id}:/root")]);
    assert_success(&out, "kiln cp the programs in");

    // The toolchain answers its version command.
    let out = k.run(&[&["exec", id.as_str(), "--"][..], lang.version()].concat());
    assert_success(&out, &format!("{lang}: version"));
    let first = stdout(&out).lines().next().unwrap_or_default().to_owned();
    assert!(first.contains(p.version), "{lang}: version said {first:?}");

    // Hello world.
    let out = compile_and_run(&k, &id, lang, "hello", b"");
    assert_exit(&out, 0, &format!("{lang}: hello"));
    assert_eq!(stdout(&out), "hello, world\n", "{lang}: hello");

    // Stdin comes back byte for byte (two lines, no trailing newline, a non-ASCII char).
    let input = "first line\nsecond: ünïcode\nno newline";
    let out = compile_and_run(&k, &id, lang, "echo", input.as_bytes());
    assert_exit(&out, 0, &format!("{lang}: echo"));
    assert_eq!(stdout(&out), input, "{lang}: echo");

    // A non-zero exit is the program's, with its stderr.
    let out = compile_and_run(&k, &id, lang, "exit3", b"");
    assert_exit(&out, 3, &format!("{lang}: exit 3"));
    assert_eq!(stderr(&out).trim_end(), "bye", "{lang}: exit 3's stderr");

    // A program that never ends is killed at the timeout (exit 124, saying so).
    let out = compile_and_run_with(&k, &id, lang, "spin", &["--timeout", "3"]);
    assert_exit(&out, 124, &format!("{lang}: spin"));
    assert!(
        stderr(&out).contains("timed out"),
        "{lang}: {}",
        stderr(&out)
    );

    // A program that prints forever is killed at the output cap, with at most that much.
    let out = compile_and_run_with(&k, &id, lang, "flood", &["--max-output", "100000"]);
    assert!(!out.status.success(), "{lang}: flood exited 0");
    let n = out.stdout.len();
    assert!(
        (50_000..=100_000).contains(&n),
        "{lang}: flood gave {n} bytes"
    );
    assert!(out.stdout.starts_with(b"y"), "{lang}: flood's output");
    assert!(
        stderr(&out).contains("exceeded"),
        "{lang}: {}",
        stderr(&out)
    );

    // A compile error is the compile step's: it fails naming the source file and the error,
    // and leaves no program for the run step.
    if let Some((_, message)) = p.broken {
        let compile = lang
            .compile()
            .expect("compiled languages have broken programs");
        let out = exec(&k, &id, "broken", compile, b"");
        assert!(
            !out.status.success(),
            "{lang}: the broken program compiled:\n{}",
            stdout(&out)
        );
        let said = format!("{}{}", stdout(&out), stderr(&out));
        assert!(said.contains(message), "{lang}: compile said {said}");
        assert!(
            said.contains(lang.source_file()),
            "{lang}: compile did not name {}: {said}",
            lang.source_file()
        );
        let bin = compile
            .windows(2)
            .find(|w| w[0] == "-o")
            .map(|w| w[1])
            .expect("the table's compile command names its output");
        let out = exec(&k, &id, "broken", &["test", "-e", bin], b"");
        assert_exit(&out, 1, &format!("{lang}: no {bin} after a failed compile"));
    }

    assert_success(&k.run(&["rm", &id]), "kiln rm");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
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
