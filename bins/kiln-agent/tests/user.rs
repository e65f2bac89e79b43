//! Execs as another user (`user-v1`): the real agent and the real host client over
//! `tokio::io::duplex`, running real processes on the test machine. The agent reads a
//! `passwd` and `group` written by each test (`AgentConfig::etc_dir`), so the users exist
//! only for the test and nothing depends on the machine's accounts.
//!
//! Switching users needs root. Run as root (as CI does), the tests check the ids, groups,
//! environment and file ownership the command really gets; run as anyone else, they check
//! that the agent refuses the switch with `bad_user` instead of running the command as
//! itself.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper};
use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, ErrorCode, ExecEvent, ExecOutput, ExecRequest, ExecUser,
    FEATURE_USER_V1, TermName, TtyRequest, TtySize,
};
use tokio::io::DuplexStream;

const PIPE: usize = 64 << 10;
/// Upper bound for any wait in these tests: turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(60);

const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
kilntest:x:4321:4322:kiln test user:/kiln-test-home:/bin/sh
";

const GROUP: &str = "\
root:x:0:
kilntest:x:4322:
kilnextra:x:4323:someone,kilntest
kilnother:x:4324:
";

fn start_agent(etc: &Path) -> tokio::sync::mpsc::UnboundedSender<DuplexStream> {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let config = AgentConfig {
        etc_dir: etc.to_path_buf(),
        ..AgentConfig::default()
    };
    let agent = Agent::new(config, reaper);
    let (conns, mut rx) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
    tokio::spawn(async move {
        while let Some(io) = rx.recv().await {
            let _ = agent.serve(io).await;
        }
    });
    conns
}

/// An agent whose account files are `passwd` and `group` (left out when `None`).
async fn connect(passwd: Option<&str>, group: Option<&str>) -> (AgentClient, tempfile::TempDir) {
    let etc = tempfile::tempdir().expect("temp dir");
    if let Some(p) = passwd {
        std::fs::write(etc.path().join("passwd"), p).expect("write passwd");
    }
    if let Some(g) = group {
        std::fs::write(etc.path().join("group"), g).expect("write group");
    }
    let conns = start_agent(etc.path());
    let (host, guest) = tokio::io::duplex(PIPE);
    conns.send(guest).expect("agent task alive");
    let config = ClientConfig {
        handshake_deadline: GUARD,
        ..ClientConfig::default()
    };
    let (client, info) = AgentClient::connect_with(host, config)
        .await
        .expect("handshake");
    assert!(info.features.iter().any(|f| f == FEATURE_USER_V1));
    (client, etc)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn as_user(user: &str, script: &str) -> ExecRequest {
    ExecRequest {
        user: Some(ExecUser::new(user).expect("valid user")),
        ..ExecRequest::new(["sh", "-c", script])
    }
}

async fn run(client: &AgentClient, req: ExecRequest) -> Result<ExecOutput, AgentError> {
    let exec = async { client.exec(req).await?.collect().await };
    tokio::time::timeout(GUARD, exec)
        .await
        .expect("exec finished within the guard time")
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf-8 output")
}

/// Not root: the agent must refuse the switch (never run the command as itself).
fn assert_refused_as_non_root(result: Result<ExecOutput, AgentError>) {
    match result {
        Err(AgentError::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadUser);
            assert!(message.contains("not root"), "{message}");
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(out) => panic!("a non-root agent ran a command as another user: {out:?}"),
    }
}

#[tokio::test]
async fn exec_as_named_user_gets_its_ids_groups_and_environment() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    // Default cwd (/root, often 0700): entered as root before the switch, as runc does.
    let result = run(
        &client,
        as_user(
            "kilntest",
            r#"id -u; id -g; id -G; echo "$HOME $USER $LOGNAME""#,
        ),
    )
    .await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as kilntest");
    assert_eq!(
        text(&out.stdout),
        "4321\n4322\n4322 4323\n/kiln-test-home kilntest kilntest\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code, Some(0));
}

#[tokio::test]
async fn exec_as_user_with_explicit_group_has_no_supplementary_groups() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    let result = run(&client, as_user("kilntest:kilnother", "id -u; id -G")).await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as kilntest:kilnother");
    assert_eq!(text(&out.stdout), "4321\n4324\n", "{}", text(&out.stderr));
}

#[tokio::test]
async fn exec_as_numeric_user_needs_no_account_files() {
    let (client, _etc) = connect(None, None).await;
    let result = run(
        &client,
        as_user(
            "1234:1235",
            r#"id -u; id -g; id -G; echo "home=$HOME user=${USER-unset}""#,
        ),
    )
    .await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as 1234:1235");
    assert_eq!(
        text(&out.stdout),
        "1234\n1235\n1235\nhome=/ user=unset\n",
        "{}",
        text(&out.stderr)
    );
    // A uid alone gets gid 0 (Docker's choice) and drops the agent's groups.
    let out = run(&client, as_user("1234", "id -u; id -G"))
        .await
        .expect("exec as 1234");
    assert_eq!(text(&out.stdout), "1234\n0\n", "{}", text(&out.stderr));
}

#[tokio::test]
async fn exec_env_wins_over_the_users_home_and_name() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    let mut req = as_user("kilntest", r#"echo "$HOME $USER $LOGNAME""#);
    req.env.insert("HOME".into(), "/elsewhere".into());
    req.env.insert("USER".into(), "someone".into());
    let result = run(&client, req).await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as kilntest");
    assert_eq!(text(&out.stdout), "/elsewhere someone kilntest\n");
}

#[tokio::test]
async fn exec_as_user_creates_files_owned_by_that_user() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod the temp dir");
    let mut req = as_user("kilntest", "echo data > made-by-user");
    req.cwd = Some(dir.path().display().to_string());
    let result = run(&client, req).await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as kilntest");
    assert_eq!(out.status.code, Some(0), "{}", text(&out.stderr));
    let meta = std::fs::metadata(dir.path().join("made-by-user")).expect("file exists");
    assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
}

#[tokio::test]
async fn exec_as_user_cannot_write_what_root_owns() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temp dir");
    let mut req = as_user("kilntest", "echo data > denied");
    req.cwd = Some(dir.path().display().to_string());
    let result = run(&client, req).await;
    if !is_root() {
        return assert_refused_as_non_root(result);
    }
    let out = result.expect("exec as kilntest");
    assert_ne!(
        out.status.code,
        Some(0),
        "a dropped user wrote into root's dir"
    );
    assert!(!dir.path().join("denied").exists());
}

#[tokio::test]
async fn exec_as_unknown_user_is_a_clear_bad_user_error() {
    let (client, etc) = connect(Some(PASSWD), Some(GROUP)).await;
    for (user, expected) in [
        (
            "ghost",
            format!("unknown user ghost: not in {}/passwd", etc.path().display()),
        ),
        (
            "kilntest:ghosts",
            format!(
                "unknown group ghosts: not in {}/group",
                etc.path().display()
            ),
        ),
    ] {
        match run(&client, as_user(user, "id")).await {
            Err(AgentError::Remote { code, message, .. }) => {
                assert_eq!(code, ErrorCode::BadUser);
                assert_eq!(message, expected);
            }
            other => panic!("{user}: expected bad_user, got {other:?}"),
        }
    }
    // The session is still usable.
    client.ping().await.expect("pong");

    let (client, etc) = connect(None, None).await;
    match run(&client, as_user("nobody", "id")).await {
        Err(AgentError::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadUser);
            assert_eq!(
                message,
                format!("unknown user nobody: no {}/passwd", etc.path().display())
            );
        }
        other => panic!("expected bad_user, got {other:?}"),
    }
}

#[tokio::test]
async fn tty_exec_as_user_owns_its_terminal() {
    let (client, _etc) = connect(Some(PASSWD), Some(GROUP)).await;
    let req = ExecRequest {
        tty: Some(TtyRequest {
            size: TtySize::new(24, 80).expect("valid size"),
            term: Some(TermName::new("xterm").expect("valid")),
        }),
        ..as_user(
            "kilntest",
            r#"echo "uid=$(id -u) tty-owner=$(stat -c %u "$(tty)")""#,
        )
    };
    let exec = async {
        let mut session = client.exec(req).await?;
        let mut seen = Vec::new();
        loop {
            match session.next_event().await {
                Some(ExecEvent::Stdout(b)) => seen.extend_from_slice(&b),
                Some(ExecEvent::Exit(status)) => return Ok((seen, status)),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let result = tokio::time::timeout(GUARD, exec)
        .await
        .expect("exit within the guard time");
    if !is_root() {
        match result {
            Err(AgentError::Remote { code, .. }) => assert_eq!(code, ErrorCode::BadUser),
            other => panic!("a non-root agent ran a command as another user: {other:?}"),
        }
        return;
    }
    let (seen, status) = result.expect("tty exec as kilntest");
    let screen = String::from_utf8_lossy(&seen);
    assert!(screen.contains("uid=4321 tty-owner=4321"), "{screen:?}");
    assert_eq!(status.code, Some(0));
}
