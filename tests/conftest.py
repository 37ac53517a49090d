"""Shared pytest fixtures. Add yours below; keep this file small and put larger helpers in their own module."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets fixtures live in helper modules such as tests/pg.py

from pg import postgres_url  # noqa: E402,F401  (session fixture: throwaway PostgreSQL server)
