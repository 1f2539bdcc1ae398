import sys
from pathlib import Path

# tests/tiny.py builds the tiny models every test uses.
sys.path.insert(0, str(Path(__file__).parent))
