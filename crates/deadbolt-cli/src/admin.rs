//! `deadbolt admin`: teams and API keys, straight in the metadata store.

use anyhow::Result;
use deadbolt_runtime::Config;

/// `deadbolt admin`: teams and API keys, straight in the metadata store
/// named by the config (operators only; keys are printed once).
#[derive(clap::Subcommand, Debug)]
pub enum Admin {
    /// Create a team.
    TeamCreate { name: String },
    /// List the teams.
    Teams,
    /// Create an API key; prints it once (only its hash is stored).
    KeyCreate {
        #[arg(long)]
        team: String,
        #[arg(long)]
        name: String,
        /// Comma-separated: submit, read, admin.
        #[arg(long, value_delimiter = ',', default_value = "submit,read")]
        scopes: Vec<String>,
        /// Expire after this many days (none: never).
        #[arg(long, allow_negative_numbers = true)]
        expires_in_days: Option<f64>,
    },
    /// List keys (never the keys themselves).
    Keys {
        #[arg(long)]
        team: Option<String>,
    },
    /// Revoke a key by id.
    KeyRevoke { id: uuid::Uuid },
    /// Set (or with no --days, clear) a key's expiry.
    KeyExpire {
        id: uuid::Uuid,
        #[arg(long, allow_negative_numbers = true)]
        days: Option<f64>,
    },
}

pub async fn admin(config: Config, cmd: Admin) -> Result<()> {
    // as the services do: with `migrate = false` (a role without DDL
    // rights) the schema is checked, not migrated
    let store = deadbolt_store::connect_with_options(
        &config.database_url,
        deadbolt_store::SessionLimits::for_lease(config.lease()),
        config.migrate,
    )
    .await?;
    let days = |d: f64| -> Result<chrono::DateTime<chrono::Utc>> {
        anyhow::ensure!(d.is_finite(), "days must be a number");
        Ok(chrono::Utc::now() + chrono::Duration::milliseconds((d * 86_400_000.0) as i64))
    };
    let key_line = |k: &deadbolt_store::ApiKey| {
        serde_json::json!({
            "id": k.id, "team": k.team, "name": k.name, "prefix": k.prefix,
            "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "expires_at": k.expires_at, "revoked_at": k.revoked_at,
            "last_used_at": k.last_used_at,
        })
    };
    match cmd {
        Admin::TeamCreate { name } => {
            let t = store.create_team(&name).await?;
            println!("{}", serde_json::json!({ "team": t.name }));
        }
        Admin::Teams => {
            for t in store.list_teams().await? {
                println!("{}", t.name);
            }
        }
        Admin::KeyCreate {
            team,
            name,
            scopes,
            expires_in_days,
        } => {
            let scopes = scopes
                .iter()
                .map(|s| s.trim().parse::<deadbolt_store::Scope>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let expires = expires_in_days.map(days).transpose()?;
            let (k, plain) = store.create_api_key(&team, &name, &scopes, expires).await?;
            let mut line = key_line(&k);
            line["key"] = serde_json::Value::String(plain);
            println!("{line}");
            eprintln!("the key is shown once; only its hash is stored");
        }
        Admin::Keys { team } => {
            for k in store.list_api_keys(team.as_deref()).await? {
                println!("{}", key_line(&k));
            }
        }
        Admin::KeyRevoke { id } => println!("{}", key_line(&store.revoke_api_key(id).await?)),
        Admin::KeyExpire { id, days: d } => {
            let at = d.map(days).transpose()?;
            println!("{}", key_line(&store.set_api_key_expiry(id, at).await?));
        }
    }
    Ok(())
}
