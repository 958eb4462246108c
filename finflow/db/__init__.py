"""PostgreSQL / TimescaleDB storage: schema migrations, partition maintenance, batch writer."""
