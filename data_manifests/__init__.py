"""What the datasets are and how to read them: image listings and question/statement records."""
