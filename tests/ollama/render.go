// Renders an Ollama Modelfile TEMPLATE the way Ollama does: Go's text/template, executed on a value whose
// .Messages holds the conversation (Ollama first adds the Modelfile's SYSTEM as a system message when the
// conversation has none). Reads {"template": "...", "messages": [{"role": ..., "content": ...}]} on stdin.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	if err := tmpl.Execute(os.Stdout, Values{Messages: in.Messages}); err != nil {
		panic(err)
	}
}
