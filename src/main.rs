fn main() {
    println!("vipo");
}
