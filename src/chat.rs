//! `rim chat`: an interactive terminal client built on `rim-client`.
//!
//! It signs in over gRPC (a node's client listener, `--api`), holds one
//! long connection to a gateway (`--gateway`, several for failover; TCP or
//! `ws://`, or inside TLS as `tls://` and `wss://`, trusting `--ca`), and prints every entry of the user's list as it arrives:
//! messages from others and the user's own sends from any device, each once
//! and in seq order (the SDK syncs after every reconnect and on seq gaps).
//!
//! Input lines: plain text goes to the current peer (`--to NAME` or
//! `/to NAME`); `@NAME text` sends to NAME once; `/group ID text` sends to
//! a group, super group or room; `/room ID` reads a room (`/leave ID`
//! stops); `/history [N]`, `/devices`, `/help`, `/quit`. A sent message is
//! shown when it comes back through the user's own list (or, for super
//! groups and rooms, the group's), which is proof that it was stored. The
//! SDK reads the user's super groups by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rim_client::{Client, ClientConfig, ClientError, Credentials, Endpoint, Event, NodeApi, Resume};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, Seq, UserId};
use rim_proto::v1::{ContentType, ConversationKind, Message};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Flags of `rim chat`. The defaults match `rim dev`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Login name.
    #[arg(long)]
    user: String,
    /// Password (also RIM_PASSWORD).
    #[arg(long, env = "RIM_PASSWORD", hide_env_values = true)]
    password: String,
    /// Create the account first if it does not exist.
    #[arg(long)]
    register: bool,
    /// Whom plain lines are sent to (login name).
    #[arg(long)]
    to: Option<String>,
    /// Gateways, comma-separated: host:port (TCP), ws://host:port/ws, or
    /// with TLS tls://host:port and wss://host:port/ws.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7400")]
    gateway: Vec<String>,
    /// CA bundle (PEM) that tls:// and wss:// gateways' certificates must
    /// chain to.
    #[arg(long, env = "RIM_CHAT_CA")]
    ca: Option<PathBuf>,
    /// A node's client gRPC listener (sign-in, history, devices).
    #[arg(long, default_value = "127.0.0.1:7201")]
    api: String,
    /// Sign in as this existing device instead of registering a new one.
    #[arg(long, default_value_t = 0)]
    device: u64,
    /// Entries of recent history shown at start.
    #[arg(long, default_value_t = 10)]
    recent: usize,
}

/// One parsed input line.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    /// Text to the current peer.
    Say(String),
    /// Text to a named user.
    SayTo(String, String),
    /// Text to a group, super group or room.
    SayToGroup(u64, String),
    /// Read a room.
    Room(u64),
    /// Stop reading a room.
    Leave(u64),
    /// Change the current peer.
    To(String),
    /// Show the last N entries.
    History(usize),
    /// List devices.
    Devices,
    /// Show help.
    Help,
    /// Leave.
    Quit,
    /// Nothing to do (empty line).
    Nothing,
    /// Not understood; the text says why.
    Invalid(String),
}

fn parse_line(line: &str) -> Input {
    let line = line.trim();
    if line.is_empty() {
        return Input::Nothing;
    }
    if let Some(rest) = line.strip_prefix('@') {
        return match rest.split_once(char::is_whitespace) {
            Some((name, text)) if !name.is_empty() && !text.trim().is_empty() => {
                Input::SayTo(name.to_string(), text.trim().to_string())
            }
            _ => Input::Invalid("usage: @name message".into()),
        };
    }
    let Some(command) = line.strip_prefix('/') else { return Input::Say(line.to_string()) };
    if let Some(rest) =
        command.strip_prefix("group").filter(|r| r.is_empty() || r.starts_with(char::is_whitespace))
    {
        return match rest.trim().split_once(char::is_whitespace) {
            Some((id, text)) if !text.trim().is_empty() => match id.parse::<u64>() {
                Ok(id) if id > 0 => Input::SayToGroup(id, text.trim().to_string()),
                _ => Input::Invalid("usage: /group ID message (ID a group number)".into()),
            },
            _ => Input::Invalid("usage: /group ID message".into()),
        };
    }
    let mut words = command.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("to"), Some(name), None) => Input::To(name.to_string()),
        (Some("history"), None, None) => Input::History(20),
        (Some("history"), Some(n), None) => match n.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Input::History(n),
            _ => Input::Invalid("usage: /history [1..1000]".into()),
        },
        (Some("devices"), None, None) => Input::Devices,
        (Some(verb @ ("room" | "leave")), Some(id), None) => match id.parse::<u64>() {
            Ok(id) if id > 0 => {
                if verb == "room" {
                    Input::Room(id)
                } else {
                    Input::Leave(id)
                }
            }
            _ => Input::Invalid(format!("usage: /{verb} ID (ID a room number)")),
        },
        (Some("help"), None, None) => Input::Help,
        (Some("quit" | "exit"), None, None) => Input::Quit,
        _ => Input::Invalid(format!("unknown command /{command} (try /help)")),
    }
}

const HELP: &str = "\
  text            send to the current peer (/to NAME sets it)
  @NAME text      send to NAME
  /group ID text  send to group, super group or room ID
  /room ID        read room ID from now on (/leave ID stops)
  /to NAME        talk to NAME from now on
  /history [N]    the last N entries of your list (default 20)
  /devices        your devices
  /quit           leave (Ctrl-D too)";

/// `HH:MM:SS` (UTC) of a time in ms since the Unix epoch.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// What the chat knows: who is who, and who it talks to.
struct Chat {
    api: NodeApi,
    me: Credentials,
    my_name: String,
    names: HashMap<UserId, String>,
    ids: HashMap<String, UserId>,
    peer: Option<(String, UserId)>,
}

impl Chat {
    async fn name_of(&mut self, user_id: UserId) -> String {
        if let Some(n) = self.names.get(&user_id) {
            return n.clone();
        }
        let name = match self.api.get_user(Some(user_id)).await {
            Ok(u) if !u.username.is_empty() => u.username,
            Ok(u) if !u.nickname.is_empty() => u.nickname,
            _ => format!("user-{user_id}"),
        };
        self.names.insert(user_id, name.clone());
        self.ids.insert(name.clone(), user_id);
        name
    }

    async fn id_of(&mut self, name: &str) -> Result<UserId, ClientError> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        let user_id = UserId(self.api.find_user(name).await?.user_id);
        self.names.insert(user_id, name.to_string());
        self.ids.insert(name.to_string(), user_id);
        Ok(user_id)
    }

    /// One line for an entry of the user's list.
    async fn render(&mut self, m: &Message) -> String {
        let text = match ContentType::try_from(m.content_type) {
            Ok(ContentType::Text) => String::from_utf8_lossy(&m.content).into_owned(),
            _ => format!("<{} bytes of content type {}>", m.content.len(), m.content_type),
        };
        let time = clock(m.send_time_ms);
        let kind = ConversationKind::try_from(m.conversation_kind).unwrap_or_default();
        let sender = UserId(m.sender_user_id);
        if matches!(kind, ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room) {
            let from = if sender == self.me.user_id { "you".to_string() } else { self.name_of(sender).await };
            let place = if kind == ConversationKind::Room { "room" } else { "group" };
            return format!(
                "[{time}] {place} {} #{} {from}: {text}",
                m.conversation_id,
                m.group_seq.max(m.seq)
            );
        }
        if sender == self.me.user_id {
            let to = self.name_of(UserId(m.conversation_id)).await;
            format!("[{time}] #{} you → {to}: {text}", m.seq)
        } else {
            let from = self.name_of(sender).await;
            format!("[{time}] #{} {from}: {text}", m.seq)
        }
    }
}

/// Runs the chat client until `/quit`, end of input or Ctrl-C.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let gateways =
        args.gateway.iter().map(|g| g.trim().parse::<Endpoint>()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!gateways.is_empty(), "--gateway needs at least one address");
    let tls = match &args.ca {
        Some(ca) => Some(rim_cluster::tls::client_config(ca)?),
        None => None,
    };
    anyhow::ensure!(
        tls.is_some() || !gateways.iter().any(Endpoint::is_tls),
        "tls:// and wss:// gateways need --ca (the CA their certificates chain to)"
    );
    let api = NodeApi::new(&args.api)?;
    if args.register {
        match api.register(&args.user, &args.password).await {
            Ok(_) => println!("registered {}", args.user),
            Err(e) if e.code() == ErrorCode::ErrorAlreadyExists => {}
            Err(e) => return Err(e).context("registering"),
        }
    }
    let device = (args.device != 0).then_some(DeviceId(args.device));
    let me = api.sign_in(&args.user, &args.password, device).await.context("signing in")?;
    let api = api.authenticated(me.clone());

    // Show recent history, then follow the list live from its head.
    let head = list_head(&api).await;
    let mut chat = Chat {
        api: api.clone(),
        me: me.clone(),
        my_name: args.user.clone(),
        names: HashMap::from([(me.user_id, args.user.clone())]),
        ids: HashMap::from([(args.user.clone(), me.user_id)]),
        peer: None,
    };
    println!(
        "signed in as {} (user {}, device {}; reuse it with --device {})",
        chat.my_name, me.user_id, me.device_id, me.device_id
    );
    if args.recent > 0 && head > Seq::ZERO {
        let from = Seq(head.0.saturating_sub(args.recent as u64));
        for m in api.history(from, args.recent).await.unwrap_or_default() {
            println!("{}", chat.render(&m).await);
        }
    }
    if let Some(name) = &args.to {
        set_peer(&mut chat, name).await;
    }
    println!("type /help for commands");

    let mut config = ClientConfig::new(gateways);
    config.resume = Resume::After(head);
    config.tls = tls;
    let (client, mut events) = Client::connect(config, me);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(e) => if !on_event(&mut chat, e).await { break },
                None => break,
            },
            line = lines.next_line() => match line {
                Ok(Some(line)) => if !on_line(&mut chat, &client, &line).await { break },
                Ok(None) | Err(_) => break,
            },
            () = &mut stop => break,
        }
    }
    client.close().await;
    Ok(())
}

/// The seq of the newest entry of the caller's list ([`Seq::ZERO`] if
/// unknown): a sync after the end returns no entries, only the head.
async fn list_head(api: &NodeApi) -> Seq {
    api.sync_page(Seq(u64::MAX - 1), 1).await.map_or(Seq::ZERO, |p| Seq(p.last_seq))
}

async fn set_peer(chat: &mut Chat, name: &str) {
    match chat.id_of(name).await {
        Ok(id) => {
            chat.peer = Some((name.to_string(), id));
            println!("talking to {name}");
        }
        Err(e) => println!("! {name}: {}", describe(&e)),
    }
}

/// Handles a client event; `false` ends the chat.
async fn on_event(chat: &mut Chat, event: Event) -> bool {
    match event {
        Event::Message(m) | Event::GroupMessage(m) | Event::RoomMessage(m) => {
            println!("{}", chat.render(&m).await)
        }
        Event::Ephemeral(m) => println!("(online only) {}", chat.render(&m).await),
        Event::Unsubscribed { group_id, code, reason } => {
            println!("* no longer reading {group_id}: {} ({reason})", code.as_str_name())
        }
        Event::Connected { gateway, .. } => println!("* connected to {gateway}"),
        Event::Synced { .. } => {}
        Event::Disconnected { reason } => println!("* disconnected ({reason}); reconnecting..."),
        Event::Kicked { code, reason } => {
            println!("* signed out by the server: {} ({reason})", code.as_str_name());
            return false;
        }
        Event::SignInRejected { code, message } => {
            println!("* sign-in refused: {} ({message})", code.as_str_name());
            return false;
        }
    }
    true
}

/// Handles an input line; `false` ends the chat.
async fn on_line(chat: &mut Chat, client: &Client, line: &str) -> bool {
    match parse_line(line) {
        Input::Nothing => {}
        Input::Quit => return false,
        Input::Help => println!("{HELP}"),
        Input::Invalid(why) => println!("! {why}"),
        Input::To(name) => set_peer(chat, &name).await,
        Input::Say(text) => match chat.peer.clone() {
            Some((_, id)) => send(client, id, text).await,
            None => println!("! nobody to talk to yet: /to NAME, or @NAME text"),
        },
        Input::SayTo(name, text) => match chat.id_of(&name).await {
            Ok(id) => send(client, id, text).await,
            Err(e) => println!("! {name}: {}", describe(&e)),
        },
        Input::SayToGroup(id, text) => {
            let client = client.clone();
            tokio::spawn(async move {
                if let Err(e) = client.send_group(GroupId(id), ContentType::Text, text.into_bytes()).await {
                    println!("! not sent to {id}: {}", describe(&e));
                }
            });
        }
        Input::Room(id) => match client.subscribe_room(GroupId(id), Seq::ZERO).await {
            Ok(out) => println!("* reading room {id} (at #{})", out.last_seq),
            Err(e) => println!("! room {id}: {}", describe(&e)),
        },
        Input::Leave(id) => match client.unsubscribe_room(GroupId(id)).await {
            Ok(()) => println!("* left room {id}"),
            Err(e) => println!("! room {id}: {}", describe(&e)),
        },
        Input::History(n) => {
            let head = list_head(&chat.api).await;
            match chat.api.history(Seq(head.0.saturating_sub(n as u64)), n).await {
                Ok(list) if list.is_empty() => println!("(no messages yet)"),
                Ok(list) => {
                    for m in list {
                        println!("{}", chat.render(&m).await);
                    }
                }
                Err(e) => println!("! history: {}", describe(&e)),
            }
        }
        Input::Devices => match chat.api.list_devices().await {
            Ok(devices) => {
                for d in devices {
                    let this = if DeviceId(d.device_id) == chat.me.device_id { " (this one)" } else { "" };
                    let info = d.info.unwrap_or_default();
                    let what = [info.brand, info.model, info.system_version].join(" ");
                    let revoked = if d.revoked { ", revoked" } else { "" };
                    println!(
                        "  device {}{this}: {} acked #{}, since {}{revoked}",
                        d.device_id,
                        if what.trim().is_empty() { "(no description)" } else { what.trim() },
                        d.ack_seq,
                        clock(d.created_ms)
                    );
                }
            }
            Err(e) => println!("! devices: {}", describe(&e)),
        },
    }
    true
}

/// Sends in the background, so the terminal keeps printing what arrives;
/// the message shows up once it is stored (it comes back through the list).
async fn send(client: &Client, to: UserId, text: String) {
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.send(to, ContentType::Text, text.into_bytes()).await {
            println!("! not sent: {}", describe(&e));
        }
    });
    // Yield so an immediate failure prints before the next prompt.
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn describe(e: &ClientError) -> String {
    format!("{e} [{}]", e.code().as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_inputs() {
        assert_eq!(parse_line("  hello there "), Input::Say("hello there".into()));
        assert_eq!(parse_line("@bob hi bob"), Input::SayTo("bob".into(), "hi bob".into()));
        assert!(matches!(parse_line("@bob"), Input::Invalid(_)));
        assert!(matches!(parse_line("@ hi"), Input::Invalid(_)));
        assert_eq!(parse_line("/to alice"), Input::To("alice".into()));
        assert_eq!(parse_line("/history"), Input::History(20));
        assert_eq!(parse_line("/history 5"), Input::History(5));
        assert!(matches!(parse_line("/history 0"), Input::Invalid(_)));
        assert!(matches!(parse_line("/history lots"), Input::Invalid(_)));
        assert_eq!(parse_line("/devices"), Input::Devices);
        assert_eq!(parse_line("/quit"), Input::Quit);
        assert_eq!(parse_line(""), Input::Nothing);
        assert!(matches!(parse_line("/frobnicate"), Input::Invalid(_)));
        assert!(matches!(parse_line("/to"), Input::Invalid(_)));
        assert_eq!(parse_line("/group 42 hello all"), Input::SayToGroup(42, "hello all".into()));
        assert!(matches!(parse_line("/group 42"), Input::Invalid(_)));
        assert!(matches!(parse_line("/group x hi"), Input::Invalid(_)));
        assert!(matches!(parse_line("/groups"), Input::Invalid(_)));
        assert_eq!(parse_line("/room 7"), Input::Room(7));
        assert_eq!(parse_line("/leave 7"), Input::Leave(7));
        assert!(matches!(parse_line("/room 0"), Input::Invalid(_)));
    }

    #[test]
    fn clock_shows_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(1_767_225_600_000 + 3_723_000), "01:02:03");
        assert_eq!(clock(86_399_999), "23:59:59");
    }
}
