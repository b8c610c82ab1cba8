"""PyInstaller entry point: the frozen executable runs exactly the console script."""

from gpu_supervise.entry import run

if __name__ == "__main__":
    run()
