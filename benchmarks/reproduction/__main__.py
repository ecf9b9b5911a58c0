from benchmarks.reproduction.cli import main

main()
