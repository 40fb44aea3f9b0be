from polca_study.cli import main

main()
