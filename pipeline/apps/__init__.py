"""Programs beside `roi run`: `roi serve`, `roi export` and the team tracking server."""
