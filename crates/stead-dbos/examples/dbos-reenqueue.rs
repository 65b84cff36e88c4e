//! Recovers a dead executor's workflows by hand, with the same call the
//! platform makes: `cargo run -p stead-dbos --example dbos-reenqueue --
//! SYSTEM_DATABASE_URL VERSION EXECUTOR_ID...` prints the re-enqueued ids.

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: dbos-reenqueue SYSTEM_DATABASE_URL VERSION EXECUTOR_ID...");
        std::process::exit(2);
    }
    let db = match stead_dbos::SystemDb::connect(&args[0]).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    match db.reenqueue(&args[2..], &args[1]).await {
        Ok(ids) => {
            for id in ids {
                println!("{id}");
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
