"""The SQL files of deepbase_duck, shipped inside the package as deepbase_duck.sql."""
