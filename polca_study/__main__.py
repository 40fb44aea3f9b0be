from polca_study.app.cli import main

main()
