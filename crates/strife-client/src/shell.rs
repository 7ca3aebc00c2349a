//! `strife shell`: an interactive menu over every client action, for people.
//! It reads plain lines, so it can also be driven through a pipe.

use crate::commands::Client;
use crate::exit::{CliError, Exit, Reply};
use std::io::{BufRead, IsTerminal, Write};
use strife_core::money::format_minor;
use strife_core::{PaymentId, Secret, UserRef};
use strife_rpc::trace::TraceContext;

const MENU: &str = "
  1) log in               2) balance              3) pay
  4) history              5) pending payments     6) send pending payments now
  7) test idempotency: send one payment twice with the same id
  8) switch session       9) log out              0) exit";

struct Input {
    lines: std::io::StdinLock<'static>,
}

impl Input {
    /// Prints `prompt` and reads one line; None at end of input.
    fn ask(&mut self, prompt: &str) -> Option<String> {
        print!("{prompt}");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_owned()),
        }
    }

    fn password(&mut self) -> Option<Secret<String>> {
        if std::io::stdin().is_terminal() {
            rpassword::prompt_password("password: ").ok().map(Secret::new)
        } else {
            self.ask("password: ").map(Secret::new)
        }
    }
}

fn show(result: Result<Reply, CliError>) {
    let reply = result.unwrap_or_else(|e| e.to_reply());
    println!("{}", reply.text);
}

pub async fn run(mut client: Client) -> Result<Reply, CliError> {
    let mut input = Input { lines: std::io::stdin().lock() };
    println!("Strife shell. Choose an action by its number.");
    loop {
        // Each action is a command of its own: a trace of its own.
        client.trace = TraceContext::for_command();
        if let Ok(reply) = client.outbox_list()
            && let Some(done) = reply.json["finished"].as_array()
        {
            for f in done {
                println!(
                    "Queued payment {} to {} ({}): {}",
                    f["payment_id"].as_str().unwrap_or(""),
                    f["to"].as_str().unwrap_or(""),
                    f["amount"].as_str().unwrap_or(""),
                    f["status"].as_str().unwrap_or("")
                );
            }
        }
        let who = client.session().map(|s| s.who.to_string()).unwrap_or_else(|_| "not logged in".into());
        println!("\n[{who}]{MENU}");
        let Some(choice) = input.ask("> ") else { break };
        match choice.as_str() {
            "1" => {
                let (Some(bank), Some(user)) = (input.ask("bank: "), input.ask("user: ")) else { break };
                let Some(password) = input.password() else { break };
                let result = client.login(&bank, &user, password).await;
                if result.is_ok() {
                    client.as_user = UserRef::new(&user, &bank).ok();
                }
                show(result);
            }
            "2" => show(client.balance().await),
            "3" => {
                let (Some(to), Some(amount)) = (input.ask("pay to (user@bank): "), input.ask("amount: "))
                else {
                    break;
                };
                show(client.pay(&to, &amount, None).await);
            }
            "4" => {
                show(client.history(crate::commands::HistoryPage { size: 20, ..Default::default() }).await)
            }
            "5" => show(client.outbox_list()),
            "6" => show(client.outbox_flush().await),
            "7" => {
                let (Some(to), Some(amount)) = (input.ask("pay to (user@bank): "), input.ask("amount: "))
                else {
                    break;
                };
                test_idempotency(&mut client, &to, &amount).await;
            }
            "8" => {
                if switch_session(&mut client, &mut input).is_none() {
                    break;
                }
            }
            "9" => {
                show(client.logout().await);
                client.as_user = None;
            }
            "0" | "q" | "exit" | "quit" => break,
            "" => {}
            other => println!("'{other}' is not on the menu"),
        }
    }
    println!("Bye.");
    Ok(Reply::done(serde_json::json!({ "exited": true }), ""))
}

/// Lists the sessions in this directory and acts for the one chosen (by
/// its number or as user@bank). A choice that is not a logged-in session
/// says so and changes nothing: the shell never falls back to another
/// session on its own. None at end of input.
fn switch_session(client: &mut Client, input: &mut Input) -> Option<()> {
    let sessions = match client.sessions() {
        Ok(s) => s,
        Err(e) => {
            println!("{}", e.to_reply().text);
            return Some(());
        }
    };
    let current = client.session().ok().map(|s| s.who);
    let acting = current.as_ref().map_or_else(|| "nobody".to_owned(), UserRef::to_string);
    if sessions.is_empty() {
        println!("No sessions here: log in first (1).");
        return Some(());
    }
    println!("Sessions (most recent login first):");
    let now = time::OffsetDateTime::now_utc();
    for (i, s) in sessions.iter().enumerate() {
        let expired =
            time::OffsetDateTime::parse(&s.expires_at, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|at| at <= now);
        println!(
            "  {}) {:<28} {} {}{}",
            i + 1,
            s.who.to_string(),
            if expired { "expired" } else { "until" },
            s.expires_at,
            if current.as_ref() == Some(&s.who) { "  (current)" } else { "" }
        );
    }
    let answer = input.ask("act as (number or user@bank, empty to keep): ")?;
    if answer.is_empty() {
        println!("Still acting as {acting}.");
        return Some(());
    }
    let chosen = match answer.parse::<usize>() {
        Ok(n) if (1..=sessions.len()).contains(&n) => sessions[n - 1].who.clone(),
        Ok(_) => {
            println!("error: {answer} is not on the list; still acting as {acting}.");
            return Some(());
        }
        Err(_) => match answer.parse::<UserRef>() {
            Ok(who) => who,
            Err(e) => {
                println!("error: {e}; still acting as {acting}.");
                return Some(());
            }
        },
    };
    if sessions.iter().any(|s| s.who == chosen) {
        println!("Now acting as {chosen}.");
        client.as_user = Some(chosen);
    } else {
        println!("error: {chosen} is not logged in here (log in with 1); still acting as {acting}.");
        // Pin the session in use, so that nothing changes under the customer.
        if client.as_user.is_none() {
            client.as_user = current;
        }
    }
    Some(())
}

/// Sends the same payment twice with one id and shows that money moved once.
async fn test_idempotency(client: &mut Client, to: &str, amount: &str) {
    let before = client.balance().await;
    let id = PaymentId::new_random().to_string();
    let first = client.pay(to, amount, Some(&id)).await;
    let second = client.pay(to, amount, Some(&id)).await;
    let after = client.balance().await;
    println!("payment id {id}");
    for (n, r) in [("first ", first), ("second", second)] {
        let reply = r.unwrap_or_else(|e| e.to_reply());
        match (reply.json["status"].as_str(), reply.json["replayed"].as_bool()) {
            (Some(status), Some(replayed)) => println!("  {n} send: {status} (replayed: {replayed})"),
            _ => println!("  {n} send: {}", reply.text),
        }
    }
    if let (Ok(b), Ok(a)) = (before, after) {
        let parse = |r: &Reply| {
            strife_core::Amount::parse(r.json["balance"].as_str().unwrap_or("0"))
                .map(|x| x.minor())
                .unwrap_or(0)
        };
        let moved = parse(&b) - parse(&a);
        let (b, a) = (b.json["balance"].as_str().unwrap_or("?"), a.json["balance"].as_str().unwrap_or("?"));
        if moved == 0 {
            println!("  balance {b} -> {a}: nothing moved.");
        } else {
            println!("  balance {b} -> {a}: {} moved, once.", format_minor(moved));
        }
    } else {
        println!("  {}", CliError::new(Exit::Unexpected, "could not read the balance").message);
    }
}
