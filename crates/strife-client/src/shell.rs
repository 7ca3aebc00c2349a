//! `strife shell`: an interactive menu over every client action, for people.
//! It reads plain lines, so it can also be driven through a pipe.

use crate::commands::Client;
use crate::exit::{CliError, Exit, Reply};
use std::io::{BufRead, IsTerminal, Write};
use strife_core::money::format_minor;
use strife_core::{PaymentId, Secret, UserRef};

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
                let Some(who) = input.ask("act as (user@bank): ") else { break };
                match who.parse::<UserRef>() {
                    Ok(w) => {
                        client.as_user = Some(w);
                        if let Err(e) = client.session() {
                            println!("{}", e.to_reply().text);
                            client.as_user = None;
                        }
                    }
                    Err(e) => println!("error: {e}"),
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
        println!(
            "  {n} send: {} (replayed: {})",
            reply.json["status"].as_str().unwrap_or("error"),
            reply.json["replayed"]
        );
    }
    if let (Ok(b), Ok(a)) = (before, after) {
        let parse = |r: &Reply| {
            strife_core::Amount::parse(r.json["balance"].as_str().unwrap_or("0"))
                .map(|x| x.minor())
                .unwrap_or(0)
        };
        let moved = parse(&b) - parse(&a);
        println!(
            "  balance {} -> {}: {} moved, once.",
            b.json["balance"],
            a.json["balance"],
            format_minor(moved)
        );
    } else {
        println!("  {}", CliError::new(Exit::Unexpected, "could not read the balance").message);
    }
}
