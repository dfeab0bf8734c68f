"""Real servers for tests, the demo and the benchmark: a throwaway PostgreSQL 15 cluster and tursodb."""
