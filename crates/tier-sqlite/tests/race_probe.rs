use std::sync::Arc;
use tiercache_sqlite::SqliteTier;
use tiercache_testkit::contract::ContractValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn probe() {
    for round in 0..20 {
        let file = std::env::temp_dir().join(tiercache_testkit::env::unique_name("race"));
        let file = Arc::new(file);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let f = Arc::clone(&file);
                tokio::spawn(async move {
                    SqliteTier::<String, ContractValue>::builder().path(&*f).build().await.map(|_| ())
                })
            })
            .collect();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                panic!("round {round}: {e:?}");
            }
        }
        let _ = std::fs::remove_file(&*file);
    }
}
