from agents.main import main

main()
