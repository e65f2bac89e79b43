//! `kiln token [--rotate]`: prints the API token that `kilnd --listen` requires on TCP,
//! creating it on first use; `--rotate` replaces it (the daemon reads the file on every
//! request, so the old token stops working at once, without a restart).

use kiln_client::ClientHome;

/// Runs `kiln token`.
pub fn run(home: &ClientHome, rotate: bool, json: bool) -> anyhow::Result<i32> {
    home.ensure()?;
    let path = home.token();
    let token = if rotate {
        kiln_client::token::rotate(&path)?
    } else {
        kiln_client::token::read_or_create(&path)?
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "token": token.to_string(), "path": path })
        );
    } else {
        println!("{token}");
    }
    Ok(0)
}
